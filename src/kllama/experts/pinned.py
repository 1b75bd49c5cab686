"""Page-locked host memory without torch's power-of-two rounding (routed experts are tens of GB)."""
from __future__ import annotations

import torch
from torch import Tensor

from kllama.errors import KllamaError


def _unregister(ptr: int) -> None:
    # Best effort: at interpreter exit the CUDA context may already be gone.
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001
        pass


def host_empty(numel: int, dtype: torch.dtype, *, pin: bool) -> Tensor:
    """An uninitialised 1-D host tensor, page-locked for fast host->GPU copies when `pin` and CUDA is available.

    Not `torch.empty(pin_memory=True)`: torch's caching host allocator rounds every block up to a power of two,
    which for a 1.1 GB expert layer pins 2.1 GB. Here the memory is a plain allocation owned by a numpy array and
    registered with `cudaHostRegister` for exactly its size, then unregistered when the last tensor using it dies.
    """
    if not (pin and torch.cuda.is_available()):
        return torch.empty(numel, dtype=dtype)
    import weakref

    import numpy as np

    nbytes = numel * dtype.itemsize
    raw = np.empty(nbytes, dtype=np.uint8)
    ptr = raw.ctypes.data
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
    if err != 0:
        raise KllamaError(f"could not pin {nbytes / 2**30:.2f} GiB of host memory for routed experts (CUDA error "
                          f"{err}); raise the locked-memory limit (ulimit -l) or free host RAM")
    weakref.finalize(raw, _unregister, ptr).atexit = False
    return torch.from_numpy(raw).view(dtype)


def pinned_copy(tensor: Tensor) -> Tensor:
    """A contiguous host copy of `tensor` in exactly-sized pinned memory (plain memory without CUDA)."""
    out = host_empty(tensor.numel(), tensor.dtype, pin=True).view(tensor.shape)
    out.copy_(tensor)
    return out
