import pytest
import torch

from hybrid_gpt import runtime
from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.runtime import ensure_fits

GiB = 2**30


@pytest.fixture
def memory(monkeypatch):
    """A machine with 64 GiB of free host memory and a GPU with 2 GiB free of 80."""
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return 2 * GiB, 80 * GiB

    monkeypatch.setattr(runtime, "host_memory_bytes", lambda: 64 * GiB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


def test_on_cuda_the_gpus_free_memory_decides(memory):
    with pytest.raises(HybridGPTError, match=r"only 2\.0 GiB of GPU memory on cuda:0 is available"):
        ensure_fits(3 * GiB, "training this model", torch.device("cuda:0"))
    assert memory == [torch.device("cuda:0")]
    ensure_fits(1 * GiB, "training this model", torch.device("cuda:0"))


def test_on_the_cpu_host_memory_decides(memory):
    ensure_fits(3 * GiB, "the model", "cpu")  # more than the GPU has free, far less than the host
    ensure_fits(3 * GiB, "the model")
    with pytest.raises(HybridGPTError, match=r"only 64\.0 GiB of memory is available"):
        ensure_fits(65 * GiB, "the model", torch.device("cpu"))
    assert memory == []  # the GPU was never asked


def test_host_memory_is_read_here():
    assert runtime.host_memory_bytes() > 0
