"""Process hygiene around CUDA-graph capture: a failed capture must leave the process as if it never began.

torch's `CUDAGraph.capture_end` does its bookkeeping only after `cudaStreamEndCapture` succeeds. When something in
the captured region invalidates the capture (a host sync such as `.item()`, an op that cannot be captured), that
call fails first, and two pieces of process-wide state stay in "capturing" mode for good:

* the default CUDA generator of the device: `capture_begin` always registers it and marks its state as capturing;
  the matching `capture_epilogue` never runs, so every later RNG draw outside a capture (`torch.rand`, weight
  init, `torch.multinomial` when sampling) fails with "Offset increment outside graph capture encountered
  unexpectedly". `private_cuda_rng` gives the capture a throwaway generator state instead, so the default one is
  never touched, whether the capture succeeds or not.
* the caching allocator: `capture_begin` opened the graph pool for the capture (`beginAllocateToPool`, one share of
  the pool); the matching `endAllocateToPool` never runs, so the allocator believes a capture is still under way
  (`torch.cuda.empty_cache()` then fails an internal assert, memory used on several streams is never recycled, and
  the pool can never be captured into again). `end_failed_capture` closes it and gives the share back.

A captured step that drew random numbers would draw them from the private state on every replay; decode steps draw
none (sampling runs outside the graphs).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

# torch's private binding that closes a capture's allocation to its pool: renamed in torch 2.8 (newest first)
_END_ALLOCATE_NAMES = ("_cuda_endAllocateToPool", "_cuda_endAllocateCurrentStreamToPool")


@contextmanager
def private_cuda_rng(device: torch.device) -> Iterator[None]:
    """Within the block, the default CUDA generator of `device` runs on a fresh state of its own; on exit it gets
    its own state back untouched (same seed and offset, never marked as capturing). Enter it outside any capture."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    default = torch.cuda.default_generators[index]
    own = default.graphsafe_get_state()  # a generator sharing the default's state
    default.graphsafe_set_state(torch.Generator(device=torch.device("cuda", index)))
    try:
        yield
    finally:
        default.graphsafe_set_state(own)


def _end_allocate_to_pool() -> Callable[[int, tuple], None] | None:
    return next((getattr(torch._C, name) for name in _END_ALLOCATE_NAMES if hasattr(torch._C, name)), None)


def end_failed_capture(graph: torch.cuda.CUDAGraph, pool: tuple) -> None:
    """End the capture `graph` began into `pool` (on the current stream and device) after an error inside it: a
    capture still valid ends normally (dropping the graph then gives its pool share back); an invalidated one has
    its allocator bookkeeping closed here, as `capture_end` would have done."""
    try:
        graph.capture_end()
        return
    except RuntimeError as exc:
        logger.debug("capture could not end: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    end_allocate = _end_allocate_to_pool()
    if end_allocate is None:
        logger.warning("this torch has no way to close a failed capture's memory pool; it stays reserved")
        return
    device = torch.cuda.current_device()
    try:
        end_allocate(device, pool)
    except RuntimeError:
        return  # capture_end got past its own allocator bookkeeping: the graph gives its share back when dropped
    torch._C._cuda_releasePool(device, pool)
