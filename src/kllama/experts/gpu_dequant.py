"""Quantized routed experts dequantized on a GPU in one pass: Triton kernels for int8 rows, int4 groups of 64 columns
and fp8 128x128 blocks.

A streamed quantized layer is dequantized into the bf16 slot on every pass (`stream.py`), so this is paid per layer
per pass. Written with torch's elementwise ops it took several passes over memory and a broadcast kernel: ~5 ms a
V2-Lite layer for fp8 blocks (an exact cast into the slot, then a broadcast multiply by the block scales in place) and
2.3 ms for int8 (one broadcast multiply), against ~0.5 ms to read 0.55 GB and write 1.1 GB at the H200's memory speed
(benchmarks/NOTES.md has the measurements). The kernels here read each value and its scale once and write the
result once: `out = (float32(value) * scale)` rounded to the output dtype, the same single rounding as
`quant.dequantize`, so both give the same bits (tests/experts/test_quant_gpu.py). Measured on an H200: 0.49 ms a
V2-Lite layer for either scheme, ~3.4 TB/s. The int4 kernel reads each packed byte and its group scale once and writes
the byte's two values side by side, with the same fp32 product and single rounding (not yet timed on a GPU).

Triton ships with torch's CUDA builds; where it is missing (CPU builds) or a weight is not on a CUDA device,
`fused_dequantize` returns False and the caller takes torch's path.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from kllama.experts.kernel_import import triton_kernels

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TILE_ROWS = 32  # rows of one program; divides the fp8 block edge, so a program's rows share one block row
_TILE_COLS = 128  # columns of one program (the fp8 block edge: one block column)
_TILE_BYTES = 64  # int4: packed bytes of one program (128 columns, two groups)
_INT4_GROUP = 64  # int4 columns per scale: quant.INT4_GROUP (quant imports this module, so it is not imported here)


def _kernels() -> ModuleType | None:
    """The Triton kernels' module (int8 rows, int4 groups, fp8 blocks), imported at first use, or None where Triton
    is missing."""
    return triton_kernels("dequant_kernels")


def _logical_shape(data: Tensor) -> torch.Size:
    # the weight shape the values stand for: int4 (uint8) packs two columns a byte
    if data.dtype == torch.uint8:
        return torch.Size((*data.shape[:-1], 2 * data.shape[-1]))
    return data.shape


def _launch_int8(kernels: ModuleType, data: Tensor, scale: Tensor, projections: int, block: int, out: Tensor) -> bool:
    cols = data.shape[-1]
    total_rows = data.numel() // cols
    grid = (math.ceil(total_rows / _TILE_ROWS), math.ceil(cols / _TILE_COLS))
    kernels.int8_rows[grid](data, scale, out, total_rows, cols, TILE_ROWS=_TILE_ROWS, TILE_COLS=_TILE_COLS)
    return True


def _launch_int4(kernels: ModuleType, data: Tensor, scale: Tensor, projections: int, block: int, out: Tensor) -> bool:
    half_cols = data.shape[-1]  # bytes of a row: K / 2
    total_rows = data.numel() // half_cols
    grid = (math.ceil(total_rows / _TILE_ROWS), math.ceil(half_cols / _TILE_BYTES))
    kernels.int4_groups[grid](data, scale, out, total_rows, half_cols, scale.shape[-1], TILE_ROWS=_TILE_ROWS,
                              TILE_BYTES=_TILE_BYTES, GROUP=_INT4_GROUP)
    return True


def _launch_fp8(kernels: ModuleType, data: Tensor, scale: Tensor, projections: int, block: int, out: Tensor) -> bool:
    *_, rows_per_expert, cols = data.shape
    part = rows_per_expert // projections
    if block != _TILE_COLS or part % _TILE_ROWS or rows_per_expert % projections:
        return False
    total_rows = data.numel() // cols
    grid = (math.ceil(total_rows / _TILE_ROWS), math.ceil(cols / _TILE_COLS))
    kernels.fp8_blocks[grid](data, scale, out, rows_per_expert, part, math.ceil(part / block), cols, scale.shape[-1],
                             TILE_ROWS=_TILE_ROWS, TILE_COLS=_TILE_COLS, BLOCK_EDGE=block)
    return True


# stored values' dtype -> the launch of its kernel (False: the kernel does not cover this weight)
_LAUNCHES: dict[torch.dtype, Callable[[ModuleType, Tensor, Tensor, int, int, Tensor], bool]] = {
    torch.int8: _launch_int8, torch.uint8: _launch_int4, torch.float8_e4m3fn: _launch_fp8}


def fused_dequantize(data: Tensor, scale: Tensor, projections: int, block: int, out: Tensor) -> bool:
    """Write `data * scale` into `out` (contiguous, the logical weight shape, same CUDA device) with one kernel: a
    `quant.QuantizedWeight`'s int8 values `[..., N, K]` with scales `[..., N]`, its int4 values packed two a byte
    `[..., N, K / 2]` (uint8) with scales `[..., N, ceil(K / 64)]`, or its fp8 values with `block` x `block` scales
    `[..., projections * ceil(N / projections / block), ceil(K / block)]`. False, with nothing written, where no
    kernel applies (no Triton, not on CUDA, a non-contiguous tensor, an fp8 projection whose rows are not a multiple
    of 32): the caller then takes `quant.dequantize`'s torch path."""
    if (data.device.type != "cuda" or data.dtype not in _LAUNCHES or out.dtype not in _OUT_DTYPES or data.dim() < 2
            or out.shape != _logical_shape(data) or out.device != data.device
            or not (data.is_contiguous() and scale.is_contiguous() and out.is_contiguous())):
        return False
    kernels = _kernels()
    if kernels is None:
        return False
    if data.numel() == 0:
        return True
    with torch.cuda.device(data.device):
        return _LAUNCHES[data.dtype](kernels, data, scale, projections, block, out)
