"""compat.py: the only module that touches PyTorch's private ops and settings, and whose public fallbacks work
(the model, engine and int8 tests pass again with every feature forced onto its public path)."""

import ast
import pathlib

import pytest
import torch
from helpers import rerun_tests

import hybrid_gpt
from hybrid_gpt import compat
from hybrid_gpt.model import kernels

PKG = pathlib.Path(hybrid_gpt.__file__).parent
ROOT = PKG.parents[1]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))  # __version__ is public


def _private_torch_uses(tree: ast.AST) -> list[str]:
    """Attribute chains rooted at ``torch`` with a private part (``torch._dynamo``, ``torch.ops.mkldnn._x``),
    imports of private torch modules, and reads of a tensor's ``._version``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "torch" and any(_private(p) for p in chain):
                found.append(".".join(["torch", *reversed(chain)]))
            elif node.attr == "_version":
                found.append("._version")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [n for n in names if n.startswith("torch") and any(_private(p) for p in n.split("."))]
    return found


def test_no_private_torch_outside_compat():
    offenders = {}
    for path in PKG.rglob("*.py"):
        if path.name == "compat.py" and path.parent == PKG:
            continue
        uses = _private_torch_uses(ast.parse(path.read_text()))
        if uses:
            offenders[str(path.relative_to(PKG))] = sorted(set(uses))
    assert not offenders, f"private torch features outside compat.py: {offenders}"


def test_the_checker_sees_private_uses():
    tree = ast.parse("import torch._dynamo\nx = torch.ops.mkldnn._linear_pointwise\ny = w._version\n"
                     "z = torch._inductor.config\nok = torch.nn.functional.linear\n")
    assert set(_private_torch_uses(tree)) == {"torch.ops.mkldnn._linear_pointwise", "._version",
                                              "torch._inductor.config", "torch._inductor", "torch._dynamo"}


@pytest.fixture
def public():
    compat.force_public(True)
    try:
        yield
    finally:
        compat.force_public(None)


def test_int_mm_fallback_equals_the_private_product(public):
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (3, 40), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (40, 7), dtype=torch.int8, generator=gen)
    expected = a.int() @ b.int()
    assert torch.equal(compat.int_mm(a, b), expected)
    compat.force_public(False)
    assert torch.equal(compat.int_mm(a, b), expected)


def test_the_public_path_switches_every_feature(public):
    described = compat.describe()
    assert described["mode"] == "public" and described["torch"] == torch.__version__
    assert {v for k, v in described.items() if k not in ("mode", "torch")} == {"public"}
    assert compat.onednn_linear() is None and not kernels.onednn_enabled()
    assert kernels.backend_name() == "PyTorch default (F.linear)"
    with compat.recompile_budget(10_000), compat.frozen_cpu_compile():
        pass  # no settings touched
    compat.force_public(False)
    assert compat.describe()["mode"] == "private where present"
    assert kernels.onednn_enabled() == (compat.onednn_linear() is not None and bool(kernels._works()))


def test_recompile_budget_raises_the_limit_and_restores_it():
    import torch._dynamo  # noqa: F401 (a test may look at the private setting it checks)

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    with compat.recompile_budget(before + 50):
        assert getattr(config, name) == before + 50
    assert getattr(config, name) == before


def test_environment_selects_the_public_path(monkeypatch):
    monkeypatch.setenv(compat.ENV, "public")
    compat.force_public(None)
    try:
        assert compat.public_only()
    finally:
        monkeypatch.delenv(compat.ENV)
        compat.force_public(None)
    assert not compat.public_only()


def test_model_engine_and_int8_tests_pass_on_the_public_path():
    """The public fallbacks must not rot: the model's, the engine's and int8's tests again, in a process with
    HYBRID_GPT_TORCH_COMPAT=public, which must really have taken the public path there."""
    rerun_tests(["tests/model/test_gpt.py", "tests/infer/test_engine.py", "tests/infer/test_int8.py"],
                {compat.ENV: "public"}, "not kernels.onednn_enabled() and compat.describe()['mode'] == 'public'")
