"""Host memory for routed experts: exact-size, never inherited by forked children, page-locked when CUDA exists.

Why not `numpy.empty` / `torch.empty(pin_memory=True)`:

* torch's caching host allocator rounds every pinned block up to a power of two (a 1.1 GB expert layer pins 2.1 GB),
  so the memory is allocated here and registered with `cudaHostRegister` for exactly its size.
* Linux copies DMA-pinned anonymous pages *eagerly* when the process forks (since 5.8/5.9 `fork()` gives the child
  its own copy of every page that may be pinned, instead of sharing it copy-on-write, so a later write cannot break
  the DMA mapping). A training process that holds 29 GB of pinned experts and starts 4 DataLoader workers or a
  16-process `datasets.map` would copy 29 GB into each child and be OOM-killed. So every buffer is an anonymous
  `mmap` marked `MADV_DONTFORK`: children simply do not get the mapping (they never touch experts), nothing is
  copied, and the parent's RSS is all there is. The same path is used with and without CUDA (only the registration
  is CUDA-only), so CPU runs and tests exercise exactly what GPU runs do.
* Every buffer of at least one huge page is advised `MADV_HUGEPAGE` before it is touched. Many servers run
  transparent huge pages in `madvise` mode (the H200 box does), where anonymous memory gets 4 KiB pages unless
  asked. With 2 MiB pages, filling and page-locking a layer's experts faults and pins 512x fewer pages: on the H200
  box that ran 1.75x faster and V2-Lite's load took 20-22 s instead of 31 s (benchmarks/host_pages.py, which also
  times the CPU expert kernel over each page kind: no faster there, within the spread). Where the kernel has no
  transparent huge pages the advice is refused and the buffer keeps small pages.
"""
from __future__ import annotations

import contextlib
import mmap
import weakref

import numpy as np
import torch
from torch import Tensor

from kllama.errors import KllamaError

# Linux/Android have MADV_DONTFORK; elsewhere (macOS, Windows) fork() of a pinned process is not the problem above.
_DONTFORK: int | None = getattr(mmap, "MADV_DONTFORK", None)
_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


def _unregister(ptr: int) -> None:
    # Best effort: at interpreter exit the CUDA context may already be gone.
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001
        pass


def dontfork_buffer(nbytes: int, *, huge: bool = True) -> mmap.mmap:
    """A private anonymous, page-aligned, zero-filled mapping of `nbytes` that forked children do not inherit,
    advised to use transparent huge pages when `huge` and it spans at least one (module docstring)."""
    if hasattr(mmap, "MAP_ANONYMOUS"):
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    else:  # Windows: no fork, no flags
        buf = mmap.mmap(-1, nbytes)
    if _DONTFORK is not None:
        buf.madvise(_DONTFORK)
    if huge and _HUGEPAGE is not None and nbytes >= HUGE_PAGE:
        with contextlib.suppress(OSError):  # EINVAL: a kernel built without transparent huge pages
            buf.madvise(_HUGEPAGE)
    return buf


def host_empty(numel: int, dtype: torch.dtype, *, pin: bool, huge: bool = True) -> Tensor:
    """A 1-D host tensor of `numel` elements (zero-filled) in a `dontfork_buffer` (huge pages unless `huge` is
    False), page-locked for fast host->GPU copies when `pin` and CUDA is available.

    The tensor keeps the mapping alive; the registration is undone when the last tensor using it dies.
    """
    nbytes = numel * dtype.itemsize
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    return mapped_tensor(dontfork_buffer(nbytes, huge=huge), dtype, pin=pin)


def mapped_tensor(buf: mmap.mmap, dtype: torch.dtype, *, pin: bool) -> Tensor:
    """A 1-D tensor of `dtype` over all of the mapping `buf` (its length a multiple of the dtype's size), registered
    as page-locked memory when `pin` and CUDA is available. The tensor keeps the mapping alive."""
    # tensor -> numpy array -> mmap: the array dies first (clearing its weakrefs, so the registration is undone
    # while the pages are still mapped), then the mapping is unmapped.
    raw = np.frombuffer(buf, dtype=np.uint8)
    if pin and torch.cuda.is_available():
        ptr, nbytes = raw.ctypes.data, raw.nbytes
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
        if err != 0:
            raise KllamaError(f"could not pin {nbytes / 2**30:.2f} GiB of host memory for routed experts (CUDA "
                              f"error {err}); raise the locked-memory limit (ulimit -l) or free host RAM")
        weakref.finalize(raw, _unregister, ptr).atexit = False
    return torch.from_numpy(raw).view(dtype)


def pinned_copy(tensor: Tensor) -> Tensor:
    """A contiguous host copy of `tensor` in an exactly-sized, fork-safe buffer (pinned when CUDA is available)."""
    out = host_empty(tensor.numel(), tensor.dtype, pin=True).view(tensor.shape)
    out.copy_(tensor)
    return out
