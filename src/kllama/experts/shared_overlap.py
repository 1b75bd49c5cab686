"""A MoE block's shared experts computed on the GPU while the CPU computes its routed experts.

DeepSeek-V2/V3's MoE block calls `experts(x, ...)` and then `shared_experts(residuals)` on the block's own input.
When the routed pass hands its experts to the CPU (decode), the GPU has nothing to do until the CPU is done, and the
shared experts only start after it: on the H200 box V2-Lite's shared experts took 21.6 us a layer, 0.56 ms a token
(benchmarks/NOTES.md, nineteenth session). `SharedOverlap` lets the routed pass enqueue them right after it hands
over to the CPU (`launch`), and the block's own `shared_experts(residuals)` call then returns that result instead of
computing it again. The result is the same tensor the block would compute: the stock forward on the same input.

* The block's input is taken by a forward pre-hook, and a held result is only returned to a call with that very
  tensor object (the stock block passes it as is), within the same block call: the block's forward hook (and the
  next call's pre-hook) drop what is held.
* Only no-grad passes launch (training and gradient checkpointing compute the shared experts where the block does).
* A block that calls its shared experts first (Qwen2-MoE) has nothing to overlap; its family records no
  `shared_after` and gets no `SharedOverlap`.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

# shared-experts module -> its SharedOverlap (an engine wired twice over one model reuses it)
_OVERLAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SharedOverlap:
    """The shared experts of one MoE block, computable inside the block's routed pass (module docstring)."""

    def __init__(self, block: nn.Module, shared: nn.Module) -> None:
        self.shared = shared
        self._stock_forward = shared.forward
        self._block_input: Tensor | None = None
        self._held: tuple[Tensor, Tensor] | None = None  # (the block's input, the shared experts' output on it)
        self.launches = 0  # shared passes computed inside a routed pass
        shared.forward = self._forward
        block.register_forward_pre_hook(self._enter, with_kwargs=True)
        block.register_forward_hook(self._leave)

    @classmethod
    def attach(cls, block: nn.Module, shared: nn.Module) -> SharedOverlap:
        """The block's SharedOverlap, made on first use."""
        overlap = _OVERLAPS.get(shared)
        if overlap is None:
            overlap = _OVERLAPS[shared] = cls(block, shared)
        return overlap

    def launch(self) -> None:
        """Compute the shared experts of the block's current input now (on the GPU: enqueue their kernels on the
        current stream), unless the input is unknown, they were computed already, or gradients are on."""
        x = self._block_input
        if x is None or self._held is not None or torch.is_grad_enabled():
            return
        self._held = (x, self._stock_forward(x))
        self.launches += 1

    def _forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        held, self._held = self._held, None
        if held is not None and x is held[0] and not args and not kwargs:
            return held[1]
        self._block_input = None  # computed here: a later launch in this block call has nothing to do
        return self._stock_forward(x, *args, **kwargs)

    def _enter(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        self._block_input = x if isinstance(x, Tensor) else None
        self._held = None

    def _leave(self, block: nn.Module, args: tuple, output: Any) -> None:
        self._block_input = None
        self._held = None
