"""Linear layers whose matrix products run on oneDNN on the CPU.

Why: PyTorch's CPU ``F.linear`` calls MKL, which runs its AVX2 code on AMD processors and its
single-threaded matrix-vector product at batch 1; oneDNN, which ships inside PyTorch too, uses
AVX-512 where the CPU has it and both threads, in full float32 precision (the measurements are in
docs/performance.md).

``Linear`` is ``nn.Linear`` with the same parameters and state-dict keys; only the kernel behind
``forward`` changes, and only for float32/bfloat16 tensors on the CPU:

- with autograd recording (training), a custom autograd function computes the forward product and
  both gradient products with oneDNN from the plain weight;
- without it (generation, evaluation), the weight is reordered once into oneDNN's blocked layout
  and the packed copy is reused until the weight changes (its version counter moves).

Everywhere else (CUDA, other dtypes, small products, weights made inside ``torch.inference_mode``,
``torch.compile``, a PyTorch without oneDNN ops or on compat's public path, a dtype whose oneDNN product
fails the self-test, e.g. bfloat16 on a CPU without AVX-512) it is plain ``F.linear``. ``HYBRID_GPT_ONEDNN=0``
(read once, at the first product) switches the oneDNN path off, e.g. to measure what it buys;
``set_enabled`` does the same in a running process. The oneDNN ops are private to PyTorch: they come from
``hybrid_gpt.compat``, as does the int8 product below.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_gpt import compat

ENV_SWITCH = "HYBRID_GPT_ONEDNN"
_DTYPES = (torch.float32, torch.bfloat16)
# A oneDNN call has a fixed cost of some microseconds over F.linear, so small products stay on F.linear:
# oneDNN pays off from a few MFLOP or, at few rows (decoding), from a weight too large for the caches.
MIN_FLOPS = 4_000_000
MIN_WEIGHT_BYTES = 512 * 1024
_available: frozenset | None = None  # the dtypes oneDNN computes right here, decided by _self_test per compat mode
_ops: tuple | None = None  # compat.onednn_linear(): (product, pack), or None
_mode: bool | None = None  # compat.public_only() when _available was decided
_enabled: bool | None = None  # HYBRID_GPT_ONEDNN, read by onednn_enabled at the first product


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN; ``x`` is [..., in] (any strides); ``weight`` is [out, in],
    plain (any strides) or packed."""
    return _ops[0](x, weight, bias)


def _agrees(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether oneDNN's products of x and w (plain, transposed in memory, packed) match F.linear's,
    to float32's precision or, in bfloat16, to bfloat16's (8 bits of mantissa)."""
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2
    try:
        expected = F.linear(x, w, b).float()
        packed = _ops[1](w)
        return all(torch.allclose(y.float(), expected, atol=tol, rtol=tol)
                   for y in (_product(x, w, b), _product(x, w.t().contiguous().t(), b), _product(x, packed, b)))
    except (RuntimeError, AttributeError, TypeError):  # an op missing here, or the CPU lacks its instructions
        return False


def _self_test() -> frozenset:
    """The dtypes of _DTYPES for which this PyTorch has the oneDNN ops and they agree with F.linear.

    Each is tested apart: oneDNN's bfloat16 products need AVX-512 (or AVX-NE-CONVERT), so on some CPUs
    bfloat16 fails where float32 works, and float32 layers should keep oneDNN there."""
    if _ops is None:
        return frozenset()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)  # never the global generator: runs must not shift
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((3, 8), (5, 8), (5,)))
        return frozenset(d for d in _DTYPES if _agrees(x.to(d), w.to(d), b.to(d)))


def _works() -> frozenset:
    global _available, _ops, _mode
    if _available is None or _mode != compat.public_only():
        _mode = compat.public_only()
        _ops = compat.onednn_linear()
        _available = _self_test()
    return _available


def onednn_enabled() -> bool:
    """True when linear layers on the CPU use oneDNN (not switched off, and it works here, in float32
    or bfloat16 at least).

    Asked on every product, so the answer is worked out once per process (reading the environment
    each time is measurable in a decode step): ``HYBRID_GPT_ONEDNN`` is read at the first product;
    ``set_enabled`` changes it afterwards."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(ENV_SWITCH, "1").strip() != "0"
    return _enabled and bool(_works())


def set_enabled(enabled: bool | None) -> None:
    """Switch the oneDNN path on or off in this process (on only where it works here); ``None``
    goes back to what ``HYBRID_GPT_ONEDNN`` says. For A/B comparisons and tests."""
    global _enabled
    _enabled = None if enabled is None else bool(enabled)


def backend_name() -> str:
    """For reports: which kernel library CPU linear layers use in this process."""
    if not onednn_enabled():
        return "PyTorch default (F.linear)"
    failed = [str(d).removeprefix("torch.") for d in _DTYPES if d not in _available]
    return "oneDNN" + (f" ({', '.join(failed)} on F.linear: its oneDNN product failed the self-test)" if failed else "")


class PackedWeight:
    """A layer's weight in oneDNN's blocked layout, re-made whenever the weight changes.

    A change is seen through the weight's version counter (any in-place op on the parameter, as
    optimizers and ``load_state_dict`` do) or its storage (``p.data = t``). Writing through
    ``p.data`` in place (``p.data.copy_(t)``) bypasses the counter: call ``p.copy_(t)`` under
    ``torch.no_grad()`` instead. Copies of a model (``copy.deepcopy``) start with an empty one.
    """

    def __init__(self):
        self.key, self.packed = None, None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (compat.tensor_version(weight), weight.data_ptr(), weight.dtype, tuple(weight.shape))
        if key != self.key:
            self.packed = _ops[1](weight.detach())
            self.key = key
        return self.packed

    def __deepcopy__(self, memo) -> "PackedWeight":
        return PackedWeight()


class _LinearFunction(torch.autograd.Function):
    """y = x W^T + b with the forward and both gradient products on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad, weight.t(), None)  # [M, out] @ [out, in]
        if ctx.needs_input_grad[1]:
            # grad^T x. oneDNN takes a transposed weight as it is but copies a transposed input, a
            # slow copy, so the smaller of x [M, in] and grad [M, out] is the one transposed.
            if x.size(1) <= grad.size(1):
                grad_w = _product(x.t().contiguous(), grad.t(), None).t()  # ([in, M] @ [M, out])^T
            else:
                grad_w = _product(grad.t().contiguous(), x.t(), None)  # [out, M] @ [M, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _use_onednn(x: torch.Tensor, rows: int, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether x @ weight.T goes to oneDNN rather than F.linear (the module docstring lists why not).
    The cheapest tests come first: this runs on every call, ~17 times per decoded token."""
    if (not x.is_cpu or x.dtype not in _DTYPES or weight.dtype != x.dtype
            or (bias is not None and bias.dtype != x.dtype) or rows == 0 or torch.compiler.is_compiling()):
        return False
    if 2 * rows * weight.numel() < MIN_FLOPS and weight.numel() * weight.element_size() < MIN_WEIGHT_BYTES:
        return False  # too small to pay oneDNN's per-call cost
    # An inference tensor (a weight made inside torch.inference_mode) has no version counter, so a
    # packed copy could go stale unseen; reordering it on every call would cost more than MKL.
    return not weight.is_inference() and onednn_enabled() and x.dtype in _available


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None) -> torch.Tensor:
    """``F.linear`` with the oneDNN path where it applies (see the module docstring); ``packed``
    keeps the weight's blocked copy between calls without autograd (without it, none is kept)."""
    rows = math.prod(x.shape[:-1])
    if not _use_onednn(x, rows, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _LinearFunction.apply(x.reshape(rows, x.size(-1)).contiguous(), weight, bias)
        return y.view(x.shape[:-1] + (weight.size(0),))
    # The op flattens N-D input and copies strided input itself (cheaper than from Python: batch-1
    # decoding makes ~17 of these calls per token).
    return _product(x, packed.get(weight) if packed is not None else weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) whose forward uses ``linear`` above."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


# --- int8: dynamically quantized linear layers that torch.compile can take in -----------------------------------


class Int8Linear(nn.Module):
    """A float32 linear layer as int8 weights (symmetric, one float32 scale per output row) and float32 bias;
    each product quantizes its input to int8 on the fly (symmetric, one scale per row of the input), multiplies
    in int8 into int32 (compat.int_mm) and scales back to float32: dynamic quantization, on the CPU.

    Why these ops rather than torch.ao's dynamic Linear: that one builds quantized tensors, which PyTorch
    deprecates, and holds a packed-weight object dynamo cannot trace; plain int8 tensors and one matrix product
    are neither, so the compiled decode step takes them in as it does float32's."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float().cpu()
        scale = (weight.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().cpu())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        step = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(rows / step).clamp(-127, 127).to(torch.int8)
        y = compat.int_mm(q, self.qweight.t()).float() * (step * self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"
