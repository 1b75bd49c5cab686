"""The CPU target: a routed-experts pass computed next to the host weights, `chunk_size` tokens per call.

The math is `routed.py`'s (shared with the GPU targets); here only where it runs: inputs move to host memory, the
pass uses the placement's `cpu_infer` intra-op threads (torch/oneDNN picks AMX, AVX-512, AVX2 or NEON kernels for
bf16), and outputs and grads move back to the device they came from.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kllama.experts.routed import PassExecutor

if TYPE_CHECKING:
    from kllama.experts.module import HostExperts


@contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with `num_threads` intra-op threads, restoring the previous count (the setting is global)."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def token_chunks(num_tokens: int, chunk_size: int) -> list[slice]:
    """`[0, num_tokens)` cut into spans of at most `chunk_size` tokens."""
    step = max(1, chunk_size)
    return [slice(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


class CpuExecutor(PassExecutor):
    """Runs a HostExperts pass on the CPU: inputs move to host, `chunk_size` tokens per call, output moves back."""

    def device(self, module: "HostExperts") -> torch.device:
        return torch.device("cpu")

    def chunks(self, module: "HostExperts", num_tokens: int) -> list[slice]:
        return token_chunks(num_tokens, module.placement.chunk_size)

    def weights(self, module: "HostExperts", num_tokens: int, backward: bool) -> tuple[Tensor, Tensor]:
        return module.host_weights()

    def context(self, module: "HostExperts") -> AbstractContextManager:
        return intra_op_threads(module.placement.cpu_threads)
