"""Light imports: the package, the CLI module, `hybrid-gpt --help` and every `<command> --help` load no torch,
numpy or transformers (each costs seconds of start-up), and the public API still resolves to the real objects.

Each check runs in a fresh interpreter, since this one has long since imported torch."""

import json
import pathlib
import subprocess
import sys

import hybrid_gpt

HEAVY = ("torch", "numpy", "transformers")
PKG = pathlib.Path(hybrid_gpt.__file__).parent


def _loaded(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it ends by printing what its checks saw, as JSON: here, parsed."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


HEAVY_NOW = f"[m for m in {HEAVY!r} if m in sys.modules]"


def test_the_cli_and_every_help_load_no_torch_numpy_or_transformers():
    seen = _loaded(f"""
import contextlib, io, json, sys
import hybrid_gpt.cli as cli
seen = {{"import": {HEAVY_NOW}}}
cli.build_parser()
seen["parser"] = {HEAVY_NOW}
codes = {{}}
for argv in [["--help"]] + [[name, "--help"] for name in cli.COMMANDS]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cli.main(argv)
        except SystemExit as e:
            codes[" ".join(argv)] = [e.code, len(out.getvalue())]
seen["help"], seen["codes"] = {HEAVY_NOW}, codes
print(json.dumps(seen))
""")
    assert seen["import"] == seen["parser"] == seen["help"] == []
    from hybrid_gpt.cli import COMMANDS

    assert set(seen["codes"]) == {"--help"} | {f"{name} --help" for name in COMMANDS}
    assert all(code == 0 and chars > 100 for code, chars in seen["codes"].values()), seen["codes"]


def test_the_option_modules_are_torch_free():
    """options.py and every config module (the option dataclasses and their constants) import no torch."""
    modules = ["hybrid_gpt.options"] + sorted(
        ".".join(p.relative_to(PKG.parent).with_suffix("").parts) for p in PKG.rglob("*config.py"))
    assert len(modules) >= 10, modules
    for module in modules:
        assert _loaded(f"import importlib, json, sys\nimportlib.import_module({module!r})\n"
                       f"print(json.dumps({HEAVY_NOW}))") == [], module


def test_the_public_api_is_the_real_objects():
    seen = _loaded(f"""
import json, sys
import hybrid_gpt
before = {HEAVY_NOW}
from hybrid_gpt import GPT, GPTConfig, HybridGPTError, KVCache, Tokenizer, __version__, generate, load
from hybrid_gpt.data.tokenizer import Tokenizer as T
from hybrid_gpt.errors import HybridGPTError as E
from hybrid_gpt.infer.engine import KVCache as K, generate as g
from hybrid_gpt.model.gpt import GPT as G, GPTConfig as C
same = [GPT is G, GPTConfig is C, KVCache is K, generate is g, Tokenizer is T, HybridGPTError is E, callable(load)]
listed = set(hybrid_gpt.__all__) <= set(dir(hybrid_gpt))
try:
    hybrid_gpt.no_such_name
    missing = None
except AttributeError as e:
    missing = str(e)
print(json.dumps({{"before": before, "same": same, "listed": listed, "missing": missing, "version": __version__}}))
""")
    assert seen["before"] == []  # `import hybrid_gpt` alone is light
    assert all(seen["same"]) and seen["listed"] and seen["version"] == hybrid_gpt.__version__
    assert seen["missing"] == "module 'hybrid_gpt' has no attribute 'no_such_name'"


def test_the_presentation_modules_are_torch_free():
    """present/ renders text and plots from plain dicts: importing any of its modules loads no torch."""
    modules = sorted(".".join(p.relative_to(PKG.parent).with_suffix("").parts) for p in (PKG / "present").glob("*.py"))
    assert "hybrid_gpt.present.bench" in modules
    code = (f"import importlib, json, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            f"print(json.dumps({HEAVY_NOW}))")
    assert _loaded(code) == []
