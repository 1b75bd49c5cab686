"""Quantized routed experts dequantized on a GPU in one pass: Triton kernels for int8 rows and fp8 128x128 blocks.

A streamed quantized layer is dequantized into the bf16 slot on every pass (`stream.py`), so this is paid per layer
per pass. Written with torch's elementwise ops it took several passes over memory and a broadcast kernel: ~5 ms a
V2-Lite layer for fp8 blocks (an exact cast into the slot, then a broadcast multiply by the block scales in place) and
2.3 ms for int8 (one broadcast multiply), against ~0.5 ms to read 0.55 GB and write 1.1 GB at the H200's memory speed
(benchmarks/NOTES.md has the measurements). The kernels here read each value and its scale once and write the
result once: `out = (float32(value) * scale)` rounded to the output dtype, the same single rounding as
`quant.dequantize`, so both give the same bits (tests/experts/test_quant_gpu.py). Measured on an H200: 0.49 ms a
V2-Lite layer for either scheme, ~3.4 TB/s.

Triton ships with torch's CUDA builds; where it is missing (CPU builds) or a weight is not on a CUDA device,
`fused_dequantize` returns False and the caller takes torch's path.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kllama.experts.kernel_import import triton_kernels

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TILE_ROWS = 32  # rows of one program; divides the fp8 block edge, so a program's rows share one block row
_TILE_COLS = 128  # columns of one program (the fp8 block edge: one block column)


def _kernels() -> tuple[Any, Any] | None:
    """The Triton kernels (int8 rows, fp8 blocks), imported at first use, or None where Triton is missing."""
    module = triton_kernels("dequant_kernels")
    return None if module is None else (module.int8_rows, module.fp8_blocks)


def fused_dequantize(data: Tensor, scale: Tensor, projections: int, block: int, out: Tensor) -> bool:
    """Write `data * scale` into `out` (contiguous, same shape and CUDA device) with one kernel: a
    `quant.QuantizedWeight`'s int8 values `[..., N, K]` with scales `[..., N]`, or its fp8 values with `block` x
    `block` scales `[..., projections * ceil(N / projections / block), ceil(K / block)]`. False, with nothing
    written, where no kernel applies (no Triton, not on CUDA, a non-contiguous tensor, an fp8 projection whose rows
    are not a multiple of 32): the caller then takes `quant.dequantize`'s torch path."""
    if (data.device.type != "cuda" or out.dtype not in _OUT_DTYPES or data.dim() < 2
            or out.shape != data.shape or out.device != data.device
            or not (data.is_contiguous() and scale.is_contiguous() and out.is_contiguous())):
        return False
    kernels = _kernels()
    if kernels is None:
        return False
    int8_rows, fp8_blocks = kernels
    *_, rows_per_expert, cols = data.shape
    total_rows = data.numel() // cols if cols else 0
    if total_rows == 0:
        return True
    grid = (math.ceil(total_rows / _TILE_ROWS), math.ceil(cols / _TILE_COLS))
    if data.dtype == torch.int8:
        with torch.cuda.device(data.device):
            int8_rows[grid](data, scale, out, total_rows, cols, TILE_ROWS=_TILE_ROWS, TILE_COLS=_TILE_COLS)
        return True
    part = rows_per_expert // projections
    if block != _TILE_COLS or part % _TILE_ROWS or rows_per_expert % projections:
        return False
    with torch.cuda.device(data.device):
        fp8_blocks[grid](data, scale, out, rows_per_expert, part, math.ceil(part / block), cols, scale.shape[-1],
                         TILE_ROWS=_TILE_ROWS, TILE_COLS=_TILE_COLS, BLOCK_EDGE=block)
    return True
