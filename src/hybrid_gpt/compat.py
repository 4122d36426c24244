"""The one place hybrid-gpt touches PyTorch's private operators and settings, each behind a public fallback.

Why: private ops (oneDNN's linear, the int8 matrix product) and private settings (dynamo's recompile limit,
inductor's freezing) are what make the CPU paths fast, but they move between releases; kept here, a torch
upgrade is a look at one file rather than a port. Every feature is detected where it is used, never assumed
from a version number, and ``HYBRID_GPT_TORCH_COMPAT=public`` (read once) or :func:`force_public` takes the
public path everywhere (plain ``F.linear``, an int8 product emulated in float32, compilation with inductor's
defaults), which the tests exercise. :func:`describe` says which path each feature takes, for reports.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

ENV = "HYBRID_GPT_TORCH_COMPAT"
_public: bool | None = None  # decided at the first question, from ENV; force_public changes it


def public_only() -> bool:
    """True when every feature takes its public path (``HYBRID_GPT_TORCH_COMPAT=public`` or force_public)."""
    global _public
    if _public is None:
        _public = os.environ.get(ENV, "").strip().lower() == "public"
    return _public


def force_public(on: bool | None = True) -> None:
    """Take the public paths (True), the private ones where present (False), or what the environment says
    (None) in this process. Kernel choices cached on the way (model/kernels.py) follow at their next call."""
    global _public
    _public = None if on is None else bool(on)


def _op(namespace, name: str) -> Callable | None:
    try:
        return getattr(namespace, name)
    except (AttributeError, RuntimeError):  # torch.ops namespaces raise RuntimeError for a missing op
        return None


def onednn_linear() -> tuple[Callable, Callable] | None:
    """(product(x, weight, bias) -> x @ weight.T + bias, pack(weight) -> weight in oneDNN's blocked layout that
    product also takes), from oneDNN's private linear ops; None on the public path or where this torch has none
    (model/kernels.py then runs F.linear, and still self-tests whatever this returns)."""
    if public_only() or not torch.backends.mkldnn.is_available():
        return None
    pointwise = _op(torch.ops.mkldnn, "_linear_pointwise")
    reorder = _op(torch.ops.mkldnn, "_reorder_linear_weight")
    if pointwise is None or reorder is None:
        return None
    return (lambda x, w, b: pointwise(x, w, b, "none", [], "")), (lambda w: reorder(w, None))


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N], by ``torch._int_mm`` where present; on the public path
    emulated in float32, exact while a dot product stays below 2^24 (K up to ~1,000 at full range)."""
    if not public_only() and (mm := getattr(torch, "_int_mm", None)) is not None:
        return mm(a, b)
    return (a.float() @ b.float()).round().to(torch.int32)


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's version counter (moved by every in-place op): how a packed copy of a weight sees it change."""
    return t._version


def mark_static_address(t: torch.Tensor) -> None:
    """Tell dynamo that ``t`` keeps its address (CUDA graphs then replay it rather than copy it in); a no-op on
    the public path, where CUDA graphs copy such inputs (slower, the same results)."""
    mark = None if public_only() else getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
    if mark is not None:
        mark(t)


def _config_patch(module_name: str, **settings) -> contextlib.AbstractContextManager:
    """``torch.<module>.config.patch(**settings)`` with the settings this torch has; nothing on the public path."""
    if public_only():
        return contextlib.nullcontext()
    try:
        import importlib

        config = importlib.import_module(f"torch.{module_name}").config
    except (ImportError, AttributeError):
        return contextlib.nullcontext()
    known = {k: v for k, v in settings.items() if hasattr(config, k)}
    return config.patch(**known) if known else contextlib.nullcontext()


def frozen_cpu_compile() -> contextlib.AbstractContextManager:
    """Around a compiled CPU step's calls: inductor's freezing (weights folded in as constants, linear layers
    pre-packed) and its C++ wrapper (no Python between kernels); on the public path, inductor's defaults."""
    return _config_patch("_inductor", freezing=True, cpp_wrapper=True)


@contextlib.contextmanager
def recompile_budget(graphs: int) -> Iterator[None]:
    """Room for at least ``graphs`` compiled graphs of one function, and an error (never a silent fall back to
    eager code) should dynamo run out of it; on the public path, dynamo's defaults."""
    dynamo = getattr(torch, "_dynamo", None)
    config = getattr(dynamo, "config", None)
    name = next((n for n in ("recompile_limit", "cache_size_limit") if hasattr(config, n)), None)
    if public_only() or name is None:
        yield
        return
    settings = {name: max(getattr(config, name), graphs)}
    if hasattr(config, "fail_on_recompile_limit_hit"):
        settings["fail_on_recompile_limit_hit"] = True
    with config.patch(**settings):
        yield


def describe() -> dict[str, str]:
    """Which path each feature takes in this process: {"torch": version, feature: "private" | "public"}."""
    def path(present: bool) -> str:
        return "private" if present and not public_only() else "public"

    dynamo_config = getattr(getattr(torch, "_dynamo", None), "config", None)
    return {
        "torch": torch.__version__,
        "mode": "public" if public_only() else "private where present",
        "onednn_linear": path(onednn_linear() is not None),
        "int_mm": path(hasattr(torch, "_int_mm")),
        "recompile_budget": path(any(hasattr(dynamo_config, n) for n in ("recompile_limit", "cache_size_limit"))),
        "frozen_cpu_compile": path(True),
    }
