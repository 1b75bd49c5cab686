"""One host copy of the routed experts per node, shared by the node's data-parallel ranks.

With N training processes on a node, private expert buffers would hold N copies of the checkpoint's experts (29 GB
each for DeepSeek-V2-Lite). Inside `node_shared_experts`, every expert buffer the loader asks for
(`expert_host_buffer`) is instead a slice of one shared-memory object per node:

* local rank 0 creates it with `memfd_create` (anonymous shared memory: no name in /dev/shm, so nothing to leak and
  no /dev/shm size limit, as containers often set) and reads the checkpoint's experts into it;
* the other ranks of the node wait, then open the same object through `/proc/<pid>/fd/<fd>` of local rank 0 and map
  it (MAP_SHARED) without reading the checkpoint; the block then closes every descriptor. The memory lives exactly
  as long as some process maps it: it goes away with the last rank, also when ranks are killed (SIGKILL included);
* every process marks its mappings MADV_DONTFORK (as `kllama.experts.pinned` does for private buffers) and, with
  CUDA, registers them as page-locked memory for its own GPU, so each GPU streams from the same pages.

RSS counts shared pages in every process that maps them; PSS splits them, so the node's sum of PSS (or `Shmem` in
/proc/meminfo) counts them once. Without several ranks per node, or where memfd is unavailable (not Linux), the
loader's buffers stay private.
"""
from __future__ import annotations

import contextlib
import contextvars
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from kllama.errors import KllamaError
from kllama.experts.pinned import host_empty, mapped_tensor

MEMFD_NAME = "kllama-experts"
_DONTFORK: int | None = getattr(mmap, "MADV_DONTFORK", None)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY


@dataclass
class _NodeMemory:
    """The shared-memory object of this node as one process sees it: local rank 0 grows it (`filling`), the others
    replay its allocations (`sizes`, in bytes) in the same order."""

    fd: int
    filling: bool
    sizes: list[int] = field(default_factory=list)
    taken: int = 0
    end: int = 0

    def take(self, numel: int, dtype: torch.dtype, pin: bool) -> tuple[Tensor, bool]:
        nbytes = numel * dtype.itemsize
        offset = self.end
        if self.filling:
            os.ftruncate(self.fd, offset + _aligned(nbytes))
            self.sizes.append(nbytes)
        else:
            if self.taken >= len(self.sizes) or self.sizes[self.taken] != nbytes:
                raise KllamaError("this rank asked for a routed-expert buffer that local rank 0 did not load "
                                  f"({nbytes} bytes at allocation {self.taken}); every rank of a node must load "
                                  "the same model_name_or_path with the same dtype")
        self.taken += 1
        self.end = offset + _aligned(nbytes)
        buf = mmap.mmap(self.fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        if _DONTFORK is not None:
            buf.madvise(_DONTFORK)
        return mapped_tensor(buf, dtype, pin=pin), not self.filling


_ACTIVE: contextvars.ContextVar[_NodeMemory | None] = contextvars.ContextVar("kllama_node_memory", default=None)


def expert_host_buffer(numel: int, dtype: torch.dtype, *, pin: bool) -> tuple[Tensor, bool]:
    """A 1-D host tensor of `numel` elements for routed-expert weights, and whether it already holds them.

    Inside `node_shared_experts` on a rank other than the node's first: the next slice of the node's shared memory,
    already filled by local rank 0 (True). Everywhere else: a fresh buffer to fill (False): on local rank 0 a slice
    of the shared memory, otherwise a private `pinned.host_empty` buffer.
    """
    memory = _ACTIVE.get()
    if memory is None or numel == 0:
        return host_empty(numel, dtype, pin=pin), False
    return memory.take(numel, dtype, pin)


def shared_memory_supported() -> bool:
    """Whether this platform has anonymous shared memory reachable by other processes (Linux memfd + /proc)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


@contextlib.contextmanager
def node_shared_experts(*, leader_rank: int, is_leader: bool) -> Iterator[None]:
    """Load a model inside this block on every rank of a torchrun job: routed experts go to one shared copy per node.

    `leader_rank` is the global rank of this node's local rank 0 and `is_leader` whether this process is it. Local
    rank 0 runs the block first; the node's other ranks enter it once local rank 0 has left it (every rank of the
    job takes part in one all-gather and one barrier). A failure on local rank 0 is reported on the others too.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1 and shared_memory_supported()):
        yield
        return
    if is_leader:
        with _leader_block():
            yield
    else:
        with _follower_block(leader_rank):
            yield


@contextlib.contextmanager
def _leader_block() -> Iterator[None]:
    memory = _NodeMemory(fd=os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC), filling=True)
    token = _ACTIVE.set(memory)
    failure = None
    try:
        yield
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _ACTIVE.reset(token)
        try:
            _exchange((os.getpid(), memory.fd, memory.sizes, failure))
            dist.barrier()  # the node's other ranks have opened the object: this descriptor may go
        finally:
            os.close(memory.fd)


@contextlib.contextmanager
def _follower_block(leader_rank: int) -> Iterator[None]:
    pid, fd, sizes, failure = _exchange(None)[leader_rank]
    try:
        if failure is not None:
            raise KllamaError(f"local rank 0 of this node failed while loading the model ({failure}); see its error")
        path = f"/proc/{pid}/fd/{fd}"
        try:
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KllamaError(f"cannot open the routed experts local rank 0 holds in shared memory ({path}: "
                              f"{exc.strerror}); run every rank of a node as the same user") from None
    except BaseException:
        dist.barrier()
        raise
    memory = _NodeMemory(fd=own, filling=False, sizes=sizes)
    token = _ACTIVE.set(memory)
    try:
        yield
        if memory.taken != len(sizes):
            raise KllamaError(f"local rank 0 loaded {len(sizes)} routed-expert buffers but this rank used "
                              f"{memory.taken}; every rank of a node must load the same model")
    finally:
        _ACTIVE.reset(token)
        os.close(own)
        dist.barrier()


def _exchange(mine: object) -> list[object]:
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
