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

import torch
from torch import Tensor

try:  # an optional part of torch's CUDA builds
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch
    triton = None

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TILE_ROWS = 32  # rows of one program; divides the fp8 block edge, so a program's rows share one block row
_TILE_COLS = 128  # columns of one program (the fp8 block edge: one block column)

if triton is not None:
    @triton.jit
    def _int8_rows_kernel(data, scale, out, total_rows, cols, TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr):
        # data/out [total_rows, cols] row-major, scale [total_rows]: out[r, c] = data[r, c] * scale[r]
        rows = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)
        offs_c = tl.program_id(1) * TILE_COLS + tl.arange(0, TILE_COLS)
        row_ok = rows < total_rows
        mask = row_ok[:, None] & (offs_c[None, :] < cols)
        offsets = rows[:, None].to(tl.int64) * cols + offs_c[None, :]
        values = tl.load(data + offsets, mask=mask).to(tl.float32)
        row_scale = tl.load(scale + rows, mask=row_ok)
        tl.store(out + offsets, (values * row_scale[:, None]).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_blocks_kernel(data, scale, out, rows_per_expert, part, blocks_per_part, cols, scale_cols,
                           TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr, BLOCK_EDGE: tl.constexpr):
        # data/out [E * rows_per_expert, cols] row-major; each expert's rows are `projections` groups of `part` rows,
        # each on its own 128x128 grid; scale [E, projections * blocks_per_part, scale_cols]. A program's TILE_ROWS
        # rows lie in one block row (part and the tile start are multiples of TILE_ROWS), its columns in one block.
        first = tl.program_id(0) * TILE_ROWS
        expert = first // rows_per_expert
        within = first % rows_per_expert
        block_row = expert * (rows_per_expert // part) * blocks_per_part + (within // part) * blocks_per_part \
            + (within % part) // BLOCK_EDGE
        block_col = tl.program_id(1)
        block_scale = tl.load(scale + block_row * scale_cols + block_col)
        rows = first + tl.arange(0, TILE_ROWS)
        offs_c = block_col * TILE_COLS + tl.arange(0, TILE_COLS)
        mask = offs_c[None, :] < cols
        offsets = rows[:, None].to(tl.int64) * cols + offs_c[None, :]
        values = tl.load(data + offsets, mask=mask).to(tl.float32)
        tl.store(out + offsets, (values * block_scale).to(out.dtype.element_ty), mask=mask)


def fused_dequantize(data: Tensor, scale: Tensor, projections: int, block: int, out: Tensor) -> bool:
    """Write `data * scale` into `out` (contiguous, same shape and CUDA device) with one kernel: a
    `quant.QuantizedWeight`'s int8 values `[..., N, K]` with scales `[..., N]`, or its fp8 values with `block` x
    `block` scales `[..., projections * ceil(N / projections / block), ceil(K / block)]`. False, with nothing
    written, where no kernel applies (no Triton, not on CUDA, a non-contiguous tensor, an fp8 projection whose rows
    are not a multiple of 32): the caller then takes `quant.dequantize`'s torch path."""
    if (triton is None or data.device.type != "cuda" or out.dtype not in _OUT_DTYPES or data.dim() < 2
            or out.shape != data.shape or out.device != data.device
            or not (data.is_contiguous() and scale.is_contiguous() and out.is_contiguous())):
        return False
    *_, rows_per_expert, cols = data.shape
    total_rows = data.numel() // cols if cols else 0
    if total_rows == 0:
        return True
    grid = (math.ceil(total_rows / _TILE_ROWS), math.ceil(cols / _TILE_COLS))
    if data.dtype == torch.int8:
        with torch.cuda.device(data.device):
            _int8_rows_kernel[grid](data, scale, out, total_rows, cols, TILE_ROWS=_TILE_ROWS, TILE_COLS=_TILE_COLS)
        return True
    part = rows_per_expert // projections
    if block != _TILE_COLS or part % _TILE_ROWS or rows_per_expert % projections:
        return False
    with torch.cuda.device(data.device):
        _fp8_blocks_kernel[grid](data, scale, out, rows_per_expert, part, math.ceil(part / block), cols,
                                 scale.shape[-1], TILE_ROWS=_TILE_ROWS, TILE_COLS=_TILE_COLS, BLOCK_EDGE=block)
    return True
