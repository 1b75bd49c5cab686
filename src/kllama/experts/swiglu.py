"""The routed experts' gated activation (`silu(gate) * up`, times each row's routing weight) in one GPU pass each
way.

Between the two grouped GEMMs of an expert layer the eager ops made five passes over `[S, I]` tensors forward
(silu, the product, the routing-weight scale, each reading and writing in bf16) and about eight backward (the
activation rebuilt under autograd, its gradient through `mul` and `silu_backward`, the concatenation of the two
halves, the routing weight's gradient). On the V2-Lite DPO step these elementwise passes took ~160 ms of a 1.38 s
step on an H200 (benchmarks/NOTES.md, twelfth session), against ~35 ms to read and write the same bytes once. The
kernels here read `hidden = [gate | up]` once and write each result once, repeating eager's arithmetic (each op in
fp32, rounded to the storage dtype where eager rounds), so they give eager's bits; only the routing weight's
gradient, a sum, adds in a different order.

They apply to SiLU-gated experts (every supported family) on CUDA in bf16/fp16, where Triton is importable (it ships
with torch's CUDA builds); elsewhere the functions return None and `kllama.experts.routed` runs the eager ops.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from kllama.experts.kernel_import import triton_kernels

_FORWARD_TILE = (8, 256)  # rows x columns of one forward program
_BACKWARD_TILE = (4, 512)  # rows of one backward program, columns per loop step (it sums each row)
_SILU_CLASSES = ("SiLU", "SiLUActivation")  # torch.nn.SiLU, transformers.activations.SiLUActivation
_eager_depth = 0  # > 0 inside `eager_gated()`


def _kernels() -> tuple[Any, Any] | None:
    """The Triton kernels (forward, backward), imported at first use, or None where Triton is missing."""
    module = triton_kernels("swiglu_kernels")
    return None if module is None else (module.gated_forward, module.gated_backward)


@contextmanager
def eager_gated() -> Iterator[None]:
    """Run the eager ops instead of the kernels inside the block (tests and benchmarks compare the two)."""
    global _eager_depth
    _eager_depth += 1
    try:
        yield
    finally:
        _eager_depth -= 1


def is_silu(act_fn: Callable[[Tensor], Tensor]) -> bool:
    """Whether an experts module's activation is SiLU (what the fused kernels compute)."""
    return act_fn is torch.nn.functional.silu or type(act_fn).__name__ in _SILU_CLASSES


def _applies(hidden: Tensor, row_weights: Tensor, act_fn: Callable[[Tensor], Tensor]) -> bool:
    return (not _eager_depth and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and hidden.dim() == 2
            and hidden.shape[1] % 2 == 0 and hidden.is_contiguous() and row_weights.dtype == hidden.dtype
            and row_weights.numel() == hidden.shape[0] and is_silu(act_fn) and _kernels() is not None)


def fused_gated(hidden: Tensor, row_weights: Tensor, act_fn: Callable[[Tensor], Tensor]) -> Tensor | None:
    """`silu(gate) * up * row_weights` of `hidden [S, 2I] = [gate | up]` and `row_weights [S, 1]` (hidden's dtype)
    -> `[S, I]`, in one kernel; None where it does not apply (the caller runs the eager ops), and where autograd
    records a graph through the inputs (the kernel has no autograd formula: the engine's passes run without one and
    differentiate by hand, `routed.experts_backward`)."""
    if torch.is_grad_enabled() and (hidden.requires_grad or row_weights.requires_grad):
        return None
    if not _applies(hidden, row_weights, act_fn):
        return None
    rows, inter = hidden.shape[0], hidden.shape[1] // 2
    out = hidden.new_empty(rows, inter)
    if rows:
        tile_rows, tile_cols = _FORWARD_TILE
        forward, _ = _kernels()
        with torch.cuda.device(hidden.device):
            forward[(math.ceil(rows / tile_rows), math.ceil(inter / tile_cols))](
                hidden, row_weights.contiguous(), out, rows, inter, TILE_ROWS=tile_rows, TILE_COLS=tile_cols)
    return out


def fused_gated_backward(hidden: Tensor, grad: Tensor, row_weights: Tensor, act_fn: Callable[[Tensor], Tensor],
                         *, want_act: bool, want_weight_grad: bool,
                         ) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """Backward of `fused_gated` given `grad [S, I]`, the gradient of its output (what `down` received): returns
    `d_hidden [S, 2I]`, the activation `act = silu(gate) * up [S, I]` (before the routing weight) when `want_act`,
    and each row's routing-weight gradient `sum(grad * act)` (fp32 `[S]`) when `want_weight_grad`; None where the
    kernel does not apply."""
    if not _applies(hidden, row_weights, act_fn) or grad.shape != (hidden.shape[0], hidden.shape[1] // 2) \
            or grad.dtype != hidden.dtype:
        return None
    rows, inter = grad.shape
    d_hidden = torch.empty_like(hidden)
    act = hidden.new_empty(rows, inter) if want_act else None
    weight_grad = hidden.new_empty(rows, dtype=torch.float32) if want_weight_grad else None
    if rows:
        tile_rows, tile_cols = _BACKWARD_TILE
        _, backward = _kernels()
        with torch.cuda.device(hidden.device):
            backward[(math.ceil(rows / tile_rows),)](
                hidden, grad.contiguous(), row_weights.contiguous(), d_hidden,
                act if act is not None else d_hidden, weight_grad if weight_grad is not None else d_hidden,
                rows, inter, WRITE_ACT=want_act, WANT_WEIGHT_GRAD=want_weight_grad,
                TILE_ROWS=tile_rows, TILE_COLS=tile_cols)
    return d_hidden, act, weight_grad
