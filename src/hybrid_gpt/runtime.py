"""Device choice and the torchrun process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.options import DTYPE_NAMES

# Precisions by the names commands take (bench --dtypes, import --dtype): the one table of them.
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise HybridGPTError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HybridGPTError("device cuda was requested but no CUDA GPU is available; use cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise HybridGPTError("device mps was requested but MPS is not available; use cpu")
    return torch.device(name)


def host_memory_bytes() -> int | None:
    """Memory the OS can still give us (MemAvailable), or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Memory still free for tensors on ``device`` (the CPU if None): a CUDA GPU's own free memory
    (which other processes' allocations reduce), else the host's; None where that cannot be read."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):  # no usable CUDA here
            return None
    return host_memory_bytes()  # the CPU, and MPS, whose memory is the host's


def ensure_fits(nbytes: int, what: str, device: torch.device | str | None = None,
                hint: str = "use a smaller model (--n-embd, --n-layer, --vocab-size)") -> None:
    """Refuse, before allocating anything, a model that could not fit in the free memory of ``device``
    (the CPU if None): a GPU's tensors live in its own memory, so host RAM says nothing about them."""
    available = available_memory_bytes(device)
    if available is not None and nbytes > available:
        where = f"GPU memory on {device}" if torch.device(device or "cpu").type == "cuda" else "memory"
        raise HybridGPTError(
            f"{what} would need about {nbytes / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of {where} "
            f"is available; {hint}"
        )


def init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group if WORLD_SIZE > 1 (NCCL on CUDA, gloo otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as set by torchrun; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world
