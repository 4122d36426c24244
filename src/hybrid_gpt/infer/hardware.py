"""The machine, measured where the models are: the environment record of a result (device, versions, CPU, which
kernels our linear layers run), the memory bandwidth and matmul rate a decode step is held against (probed, and
sampled again between the timed runs), the roofline limit of a decode step on them, and the peak memory.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics

import torch

from hybrid_gpt import compat
from hybrid_gpt.infer.costs import roofline_seconds, step_costs
from hybrid_gpt.infer.entries import precision
from hybrid_gpt.infer.timing import median_time, time_call
from hybrid_gpt.model import kernels
from hybrid_gpt.model.gpt import GPT


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def linear_kernels(device: torch.device) -> str:
    """Which kernels our linear layers run on ``device`` (oneDNN is CPU-only)."""
    return kernels.backend_name() if device.type == "cpu" else "F.linear"


def environment(device: torch.device, dtypes: list[str]) -> dict:
    """What ran: the device and precisions, torch and Python, threads, the machine and CPU, our linear layers'
    kernels, the GPU, and the peers' packages where installed."""
    env = {"device": str(device), "dtype": ",".join(dtypes), "torch": torch.__version__,
           "python": platform.python_version(),
           "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(),
           # Our CPU linear layers use oneDNN, the peer's use PyTorch's default (MKL): say which ran.
           "linear_kernels": linear_kernels(device),
           "torch_paths": compat.describe()}  # which private torch features ran, or their public fallbacks
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for package in ("transformers", "ctranslate2"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            pass
    return env


def probe_matrix(device: torch.device) -> torch.Tensor:
    """256 MiB (CPU) / 1 GiB (GPU) of float32: far more than any cache, so reading it measures memory."""
    n = 8192 if device.type == "cpu" else 16384
    return torch.randn(n, n, device=device)


@torch.inference_mode()
def read_rate(a: torch.Tensor, device: torch.device) -> float:
    """Bytes/s of one streaming read (a sum) of ``a``."""
    return a.numel() * a.element_size() / time_call(lambda: a.sum(), device)


@torch.inference_mode()
def measure_hardware(device: torch.device, repeats: int = 5, read_rates: list[float] | None = None,
                     probe: torch.Tensor | None = None) -> dict:
    """The machine's own limits, measured here: memory bandwidth as the faster of a large
    matrix-vector product and a plain streaming read (a sum) of the same 256 MiB / 1 GiB, each of
    which reads every byte once, and matmul throughput from a large square product by the model's own
    linear layers (kernels.Linear, packed as in generation): the ceiling of the kernels a decode runs,
    not of torch.matmul's, which on the CPU is a slower library (see model/kernels.py).

    The streaming read is usually the faster, so the limit is the memory system's, not one BLAS
    kernel's: a decode that reaches it cannot go faster by a better matrix-vector kernel.
    ``read_rates`` are more streaming-read samples, taken between the timed runs (see run_bench):
    on a shared machine the bandwidth itself moves (45-81 GB/s in one day on ours), so the limit
    must be measured while the models are; ``probe`` is the matrix they read (a new one if None)."""
    a = probe_matrix(device) if probe is None else probe
    v = torch.randn(a.size(1), device=device)
    matvec = a.numel() * 4 / median_time(lambda: a @ v, device, repeats)
    reads = [read_rate(a, device) for _ in range(repeats + 1)][1:] + list(read_rates or [])
    read = statistics.median(reads)
    m = 1024 if device.type == "cpu" else 8192
    with torch.inference_mode(False):  # a weight with a version counter, as a model's, so it is packed once
        layer = kernels.Linear(m, m, bias=False, device=device)
    x = torch.randn(m, m, device=device)
    flops = 2 * m**3 / median_time(lambda: layer(x), device, repeats)
    n = a.size(0)
    return {"memory_bandwidth_bytes_per_s": max(matvec, read), "matvec_bytes_per_s": matvec,
            "streaming_read_bytes_per_s": read, "streaming_read_range_bytes_per_s": [min(reads), max(reads)],
            "streaming_read_samples": len(reads), "matmul_flops_per_s": flops,
            "method": f"the faster of a {n}x{n} float32 matrix-vector product (median of {repeats}) and a sum of "
                      f"the same matrix (median of {len(reads)}, {len(reads) - repeats} of them between the timed "
                      f"runs; range {min(reads) / 1e9:.1f}-{max(reads) / 1e9:.1f} GB/s); {m}x{m} float32 product "
                      f"by the model's linear layers ({linear_kernels(device)})"}


def decode_limit(model: GPT, context: int, batch: int, hw: dict) -> float:
    """Tokens/s at the hardware limit for one cached decode step at ``context`` (infer/costs.py's roofline), in
    the entry's precision (int8: 1-byte linear weights, the rest float32)."""
    return batch / roofline_seconds(step_costs(model.config, context=context, batch=batch, dtype=precision(model)),
                                    hw)


def peak_memory(device: torch.device) -> dict:
    """The benchmark's peak memory: {"peak_memory_bytes"} (on the CPU, with "peak_memory_note": what it counts)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device)}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_note": "peak resident memory of the whole benchmark process (all models together)"}
