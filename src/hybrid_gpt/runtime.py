"""Device choice and the torchrun process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import HybridGPTError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise HybridGPTError(f"unknown --device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HybridGPTError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise HybridGPTError("--device mps was requested but MPS is not available; use --device cpu")
    return torch.device(name)


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
