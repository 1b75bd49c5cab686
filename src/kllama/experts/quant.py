"""Routed-expert weights held quantized in host memory: int8 per output channel, int4 in groups of 64 columns per
row, fp8 e4m3 in 128x128 blocks.

A `QuantizedWeight` stands for one fused expert projection `[E, N, K]` (N output channels, K inputs) as `data` in
int8, uint8 (two int4 values a byte) or float8_e4m3fn plus fp32 `scale`s, `weight ~= value * scale`:

* int8 (symmetric, per output channel): `scale [E, N] = amax(|row|) / 127`, values rounded to nearest;
* int4 (symmetric, per output row and group of `INT4_GROUP` = 64 consecutive inputs, the last group of a row shorter
  when K is not a multiple of 64): `scale [E, N, ceil(K / 64)] = amax(|group|) / 7`, values `q` rounded to nearest
  in [-7, 7] and packed two a byte, `data [E, N, K / 2]` uint8: byte j of a row holds column 2j in its low nibble
  and column 2j + 1 in its high nibble, each stored as `q + 8` (K must be even);
* fp8 (e4m3fn, per 128x128 block): `scale [E, P * ceil(N / P / 128), ceil(K / 128)] = amax(|block|) / 448`, the
  layout of DeepSeek-V3's `weight_scale_inv`. `P` (`projections`) is the number of projections fused along N, each
  with its own block grid: 2 for `gate_up` (gate rows, then up rows, as the checkpoint stores them separately), 1 for
  `down`. With N / P a multiple of 128 the grid is the plain 128-row grid of the fused weight. int8 and int4 scale
  rows, so `projections` changes nothing for them.

Why these three (docs/design.md, "Quantized routed experts"): int8 per channel is the format torch has a CPU kernel
for (`torch._weight_int8pack_mm`, decode); fp8 blocks are the format fp8 checkpoints ship in, read without a round
trip through bf16. Both halve the bytes of bf16 in host RAM and over PCIe. int4 halves them again (0.5625 bytes a
weight with its fp32 group scales): what lets the largest MoE models (DeepSeek-V3, 671 B parameters, ~350 GB) sit in
one host's RAM, and the kind of format KTransformers users serve with; its 15 levels need the small groups (one
outlier spoils 64 values, not a row) and cost more quality than int8 or fp8 (benchmarks/quant_quality.py measures
it). `shape` is always the logical `[..., N, K]`; `data.shape` is what is stored. `dequantize` turns any of them into
the compute dtype (`dtype`, the model's weights dtype) with one rounding, on whatever device the weight is.
Quantizing gives the same bytes on the CPU and on a GPU (a model quantized where it was loaded equals one quantized
on the host).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from kllama.errors import KllamaError
from kllama.experts.gpu_dequant import fused_dequantize

# Config values of `expert_dtype`: auto keeps the checkpoint's own format (fp8 for fp8 checkpoints, else unquantized;
# never int4, which costs quality: only asked for by name).
EXPERT_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp8", "int8", "int4")
# scheme -> dtype of its stored values (int4: two values a byte)
QUANT_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}
_SCHEMES: dict[torch.dtype, str] = {dtype: scheme for scheme, dtype in QUANT_DTYPES.items()}
BLOCK = 128  # fp8 block edge (rows and columns), as DeepSeek-V3's weight_block_size [128, 128]
INT8_MAX = 127.0
INT4_GROUP = 64  # int4: consecutive input columns of a row sharing one scale
INT4_MAX = 7.0  # int4 is symmetric: q in [-7, 7] (the nibble 0, i.e. -8, is never written)
INT4_ZERO = 8  # a nibble holds q + 8
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


@dataclass
class QuantizedWeight:
    """One (possibly batched) weight `[..., N, K]` stored quantized; see the module docstring for `scale`'s shape."""

    data: Tensor  # int8 | float8_e4m3fn [..., N, K]; int4: uint8 [..., N, K // 2], two values a byte
    scale: Tensor  # float32: int8 [..., N]; int4 [..., N, ceil(K/64)]; fp8 [..., P * ceil(N/P/128), ceil(K/128)]
    dtype: torch.dtype  # the dtype `dequantize` returns (the model's weights dtype)
    projections: int = 1  # fp8: projections fused along N, each with its own block grid

    @property
    def scheme(self) -> str:
        """`int8`, `int4` or `fp8` (from the stored values' dtype)."""
        return _SCHEMES[self.data.dtype]

    @property
    def shape(self) -> torch.Size:
        """The logical weight shape `[..., N, K]` (for int4 twice `data`'s last dim)."""
        if self.data.dtype == torch.uint8:
            return torch.Size((*self.data.shape[:-1], 2 * self.data.shape[-1]))
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held (values and scales)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale))

    def expert(self, index: int) -> "QuantizedWeight":
        """Expert `index` of a batched `[E, N, K]` weight (views, no copy)."""
        return QuantizedWeight(self.data[index], self.scale[index], self.dtype, self.projections)

    def experts(self, start: int, stop: int) -> "QuantizedWeight":
        """Experts `[start, stop)` of a batched `[E, N, K]` weight, values and scales sliced alike (views, no copy;
        contiguous when the weight is)."""
        return QuantizedWeight(self.data[start:stop], self.scale[start:stop], self.dtype, self.projections)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "QuantizedWeight":
        """Copies of values and scales on `device`."""
        return QuantizedWeight(self.data.to(device, non_blocking=non_blocking),
                               self.scale.to(device, non_blocking=non_blocking), self.dtype, self.projections)

    def empty_like(self, device: torch.device | str) -> "QuantizedWeight":
        """Uninitialised buffers of the same shapes and dtypes on `device` (a landing slot for copies)."""
        return QuantizedWeight(torch.empty(self.data.shape, dtype=self.data.dtype, device=device),
                               torch.empty(self.scale.shape, dtype=self.scale.dtype, device=device), self.dtype,
                               self.projections)

    def copy_(self, other: "QuantizedWeight", non_blocking: bool = False) -> None:
        """Copy `other`'s values and scales into these buffers (same shapes)."""
        self.data.copy_(other.data, non_blocking=non_blocking)
        self.scale.copy_(other.scale, non_blocking=non_blocking)

    def matches(self, other: "QuantizedWeight") -> bool:
        """Same shapes and dtypes (the buffers can receive `other`)."""
        return (self.data.shape == other.data.shape and self.data.dtype == other.data.dtype
                and self.scale.shape == other.scale.shape)


# A frozen routed-expert weight as the engine holds it: a plain tensor (not quantized) or a QuantizedWeight.
ExpertWeight = Union[Tensor, QuantizedWeight]


def scale_shape(scheme: str, shape: tuple[int, ...], projections: int = 1) -> tuple[int, ...]:
    """Shape of the scales of a `[..., N, K]` weight quantized with `scheme`."""
    *lead, rows, cols = shape
    if scheme == "int8":
        return (*lead, rows)
    if scheme == "int4":
        return (*lead, rows, math.ceil(cols / INT4_GROUP))
    if rows % projections:
        raise ValueError(f"{rows} rows do not split into {projections} projections")
    return (*lead, projections * math.ceil(rows // projections / BLOCK), math.ceil(cols / BLOCK))


def values_shape(scheme: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the stored values of a `[..., N, K]` weight quantized with `scheme` (int4: `[..., N, K // 2]`)."""
    if scheme == "int4":
        *lead, cols = shape
        return (*lead, cols // 2)
    return tuple(shape)


def check_scheme(expert_dtype: str) -> None:
    """Raise KllamaError unless `expert_dtype` is one of EXPERT_DTYPES."""
    if expert_dtype not in EXPERT_DTYPES:
        raise KllamaError(f"expert_dtype: {expert_dtype!r} is not one of {', '.join(EXPERT_DTYPES)}")


# ---- quantize ------------------------------------------------------------------------------------------------

def _div_exact(t: Tensor, divisor: float) -> Tensor:
    """`t / divisor`, correctly rounded on every device. CUDA divides by a Python number (a CPU scalar) as a multiply
    by its reciprocal, which can land one ulp off the CPU's quotient: scales, and so quantized bytes, would depend on
    where a weight was quantized. A 0-dim tensor on `t`'s device is divided exactly on both."""
    return t / t.new_full((), divisor)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """`weight [..., N, K]` (any float dtype) -> (int8 values, fp32 scales `[..., N]`): symmetric per row, rounded to
    nearest; an all-zero row gets scale 1."""
    w = weight.float()
    scale = _div_exact(w.abs().amax(dim=-1), INT8_MAX)  # [..., N]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def pack_int4(q: Tensor) -> Tensor:
    """Integer values in [-8, 7] `[..., K]` (K even, any integer dtype) -> uint8 `[..., K // 2]`: byte j holds
    column 2j in its low nibble and column 2j + 1 in its high nibble, each as `q + 8`."""
    nibbles = (q.to(torch.int16) + INT4_ZERO).to(torch.uint8)  # [..., K], 0..15
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(data: Tensor) -> Tensor:
    """uint8 `[..., K // 2]` as `pack_int4` writes it -> int8 values `[..., K]` (each nibble minus 8)."""
    nibbles = torch.stack((data & 0x0F, data >> 4), dim=-1)  # [..., K // 2, 2]: (even column, odd column)
    return nibbles.view(torch.int8).flatten(-2).sub_(INT4_ZERO)


def _grouped(t: Tensor, cols: int) -> Tensor:
    # [..., N, cols] zero-padded to whole groups and viewed [..., N, G, INT4_GROUP]
    groups = math.ceil(cols / INT4_GROUP)
    padded = torch.nn.functional.pad(t, (0, groups * INT4_GROUP - cols))
    return padded.view(*t.shape[:-1], groups, INT4_GROUP)


def quantize_int4(weight: Tensor) -> tuple[Tensor, Tensor]:
    """`weight [..., N, K]` (K even, any float dtype) -> (packed uint8 values `[..., N, K // 2]`, fp32 scales
    `[..., N, ceil(K / 64)]`): symmetric per row and group of 64 columns (`amax / 7`), rounded to nearest in
    [-7, 7]; an all-zero group gets scale 1. Raises KllamaError for an odd K (two values share a byte)."""
    cols = weight.shape[-1]
    if cols % 2:
        raise KllamaError(f"expert_dtype: int4 packs two input columns a byte, but a routed-expert projection has "
                          f"{cols} (odd) input columns; use expert_dtype int8 or fp8 for this model")
    groups = _grouped(weight.float(), cols)  # [..., N, G, 64]
    scale = _div_exact(groups.abs().amax(dim=-1), INT4_MAX)  # [..., N, G]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / scale.unsqueeze(-1)).clamp_(-INT4_MAX, INT4_MAX)
    return pack_int4(q.flatten(-2)[..., :cols]), scale


def _blocked(t: Tensor, rows: int, cols: int) -> Tensor:
    # [..., rows, cols] zero-padded to whole blocks and viewed [..., nb, BLOCK, kb, BLOCK]
    nb, kb = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.nn.functional.pad(t, (0, kb * BLOCK - cols, 0, nb * BLOCK - rows))
    return padded.view(*t.shape[:-2], nb, BLOCK, kb, BLOCK)


def quantize_fp8_blocks(weight: Tensor) -> tuple[Tensor, Tensor]:
    """`weight [..., N, K]` -> (float8_e4m3fn values, fp32 scales `[..., ceil(N/128), ceil(K/128)]`), one scale per
    128x128 block (`amax / 448`, so the largest value of a block maps to fp8's largest), rounded to nearest; an
    all-zero block gets scale 1."""
    *lead, rows, cols = weight.shape
    blocks = _blocked(weight.float(), rows, cols)  # [..., nb, B, kb, B]
    scale = _div_exact(blocks.abs().amax(dim=(-3, -1)), FP8_MAX)  # [..., nb, kb]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = (blocks / scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = scaled.view(*lead, scaled.shape[-4] * BLOCK, scaled.shape[-2] * BLOCK)[..., :rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def quantize_projection(weight: Tensor, scheme: str) -> tuple[Tensor, Tensor]:
    """One projection `[..., N, K]` quantized with `scheme` (`int8` | `int4` | `fp8`)."""
    return _QUANTIZERS[scheme](weight)


_QUANTIZERS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8_blocks}
_PER_ROW = ("int8", "int4")  # schemes whose scales never span rows: fused projections need no grid of their own


def quantize(weight: Tensor, scheme: str, *, projections: int = 1, dtype: torch.dtype | None = None,
             ) -> QuantizedWeight:
    """`weight [..., N, K]` as a QuantizedWeight with `scheme`; `projections` equal row groups get their own fp8
    block grids (2 for a fused gate_up; int8 and int4 scale rows, so it changes no byte for them, only the recorded
    `projections`); `dtype` (default the weight's) is what it dequantizes to."""
    if scheme not in _QUANTIZERS:
        raise ValueError(f"unknown quantization scheme {scheme!r}; one of {', '.join(_QUANTIZERS)}")
    dtype = dtype or weight.dtype
    if scheme in _PER_ROW or projections == 1:
        data, scale = quantize_projection(weight, scheme)
        return QuantizedWeight(data, scale, dtype, projections)
    parts = [quantize_projection(part, scheme) for part in weight.chunk(projections, dim=-2)]
    return QuantizedWeight(torch.cat([p[0] for p in parts], dim=-2), torch.cat([p[1] for p in parts], dim=-2),
                           dtype, projections)


def constant_quantized(shape: tuple[int, ...], scheme: str, dtype: torch.dtype, projections: int = 1,
                       ) -> QuantizedWeight:
    """A QuantizedWeight of `shape` whose every value is 1 x scale 0.01 (no full-precision tensor is made): timing
    probes, where values do not change the cost."""
    ones = {"int8": lambda: torch.ones(shape, dtype=torch.int8),
            "int4": lambda: torch.full(values_shape("int4", shape), 0x99, dtype=torch.uint8),  # nibbles 1 + 8
            "fp8": lambda: torch.full(shape, 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)}  # 0x38 = 1.0
    scale = torch.full(scale_shape(scheme, shape, projections), 0.01)
    return QuantizedWeight(ones[scheme](), scale, dtype, projections)


# ---- dequantize ----------------------------------------------------------------------------------------------

def _fp16_bits(data: Tensor) -> Tensor:
    # e4m3fn's 7 magnitude bits placed at fp16's bits 13..7 (sign at 15) read as fp16 are the value * 2^-8 exactly,
    # normals and subnormals alike: fp16's exponent bias is 8 more than e4m3's. Integer ops only (fast on any CPU).
    bits = data.view(torch.int8).to(torch.int16) << 7  # sign-extended: a negative value also sets bit 14
    return torch.bitwise_and(bits, -16512).view(torch.float16)  # -16512 = 0xBF80: sign + the 7 magnitude bits


def _decode_cast(data: Tensor, dtype: torch.dtype) -> Tensor:
    return data.to(dtype)


def _decode_fp16_bits(data: Tensor, dtype: torch.dtype) -> Tensor:
    return _fp16_bits(data).to(dtype).mul_(256.0)


# Two exact ways to turn fp8 values into a float dtype on the CPU: torch's cast (vectorised only on some builds and
# ISAs) and the fp16 bit placement above; the faster one is measured once per dtype and thread count.
FP8_DECODERS: dict[str, Callable[[Tensor, torch.dtype], Tensor]] = {
    "cast": _decode_cast, "fp16-bits": _decode_fp16_bits}
_CHOSEN_DECODER: dict[tuple, str] = {}


def fastest_fp8_decoder(dtype: torch.dtype, repeats: int = 3) -> str:
    """The FP8_DECODERS form with the lowest median time on this CPU for a 1M-element probe (measured once per
    dtype and intra-op thread count)."""
    key = (dtype, torch.get_num_threads())
    if key not in _CHOSEN_DECODER:
        probe = torch.linspace(-FP8_MAX, FP8_MAX, 1 << 20).to(torch.float8_e4m3fn)
        times: dict[str, list[float]] = {name: [] for name in FP8_DECODERS}
        for name, fn in FP8_DECODERS.items():
            fn(probe, dtype)
            for _ in range(repeats):
                start = time.perf_counter()
                fn(probe, dtype)
                times[name].append(time.perf_counter() - start)
        _CHOSEN_DECODER[key] = min(times, key=lambda name: statistics.median(times[name]))
    return _CHOSEN_DECODER[key]


def decode_fp8(data: Tensor, dtype: torch.dtype) -> Tensor:
    """float8_e4m3fn values as `dtype` (exact): torch's cast on a GPU, the measured faster form on the CPU."""
    if data.device.type != "cpu":
        return data.to(dtype)
    return FP8_DECODERS[fastest_fp8_decoder(dtype)](data, dtype)


def _scale_blocks_(out: Tensor, scale: Tensor, projections: int) -> None:
    # out [..., N, K] (contiguous) *= its 128x128 block scales, each projection's row group on its own grid
    *lead, rows, cols = out.shape
    part = rows // projections
    nb, kb = math.ceil(part / BLOCK), math.ceil(cols / BLOCK)
    if part % BLOCK == 0 and cols % BLOCK == 0:  # real models: one broadcast multiply over a blocked view
        out.view(*lead, projections * nb, BLOCK, kb, BLOCK).mul_(scale.view(*lead, projections * nb, 1, kb, 1))
        return
    full = scale.view(*lead, projections, nb, kb).repeat_interleave(BLOCK, dim=-2)[..., :part, :]
    full = full.repeat_interleave(BLOCK, dim=-1)[..., :cols]  # [..., P, part, K]
    out.view(*lead, projections, part, cols).mul_(full)


def _empty_out(weight: QuantizedWeight, out: Tensor | None) -> Tensor:
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if out is None else out


def _dequantize_int8(weight: QuantizedWeight, out: Tensor | None) -> Tensor:
    out = _empty_out(weight, out)
    return torch.mul(weight.data, weight.scale.unsqueeze(-1), out=out)  # int8 * fp32 computed in fp32


def _dequantize_int4(weight: QuantizedWeight, out: Tensor | None) -> Tensor:
    # unpacked values times their group scales, int8 * fp32 computed in fp32 and rounded once into `out`
    out = _empty_out(weight, out)
    values = unpack_int4(weight.data)  # int8 [..., N, K]
    *lead, rows, cols = values.shape
    if cols % INT4_GROUP == 0:  # real models: one broadcast multiply over a grouped view
        groups = cols // INT4_GROUP
        torch.mul(values.view(*lead, rows, groups, INT4_GROUP), weight.scale.unsqueeze(-1),
                  out=out.view(*lead, rows, groups, INT4_GROUP))
        return out
    scales = weight.scale.repeat_interleave(INT4_GROUP, dim=-1)[..., :cols]  # [..., N, K]
    return torch.mul(values, scales, out=out)


def _dequantize_fp8(weight: QuantizedWeight, out: Tensor | None) -> Tensor:
    if out is not None and weight.device.type != "cpu":
        out.copy_(weight.data)  # fp8 -> bf16/fp16/fp32 is exact
    else:
        decoded = decode_fp8(weight.data, weight.dtype if out is None else out.dtype)
        out = decoded if out is None else out.copy_(decoded)
    _scale_blocks_(out, weight.scale, weight.projections)  # in place, times fp32 scales: formed in fp32, one rounding
    return out


# torch's form of each scheme's dequantization (any device; the GPU kernels give the same bits)
_DEQUANTIZERS: dict[str, Callable[[QuantizedWeight, Tensor | None], Tensor]] = {
    "int8": _dequantize_int8, "int4": _dequantize_int4, "fp8": _dequantize_fp8}


def dequantize(weight: "ExpertWeight", out: Tensor | None = None, *, kernel: bool = True) -> Tensor:
    """The weight in its compute dtype on its device (a plain tensor is returned as it is); written into `out`
    (contiguous, of the logical shape `weight.shape`) when given. One rounding: values times scales are formed in
    fp32. On a CUDA device one Triton kernel does it (`gpu_dequant`) unless `kernel` is False (torch's ops: the
    benchmarks' baseline)."""
    if not isinstance(weight, QuantizedWeight):
        return weight if out is None else out.copy_(weight)
    if out is None and weight.device.type == "cuda":
        out = _empty_out(weight, out)
    if kernel and out is not None and fused_dequantize(weight.data, weight.scale, weight.projections, BLOCK, out):
        return out  # one Triton kernel on a GPU (the same bits as the torch forms, ~5-10x faster)
    return _DEQUANTIZERS[weight.scheme](weight, out)


def dequantize_blocks(data: Tensor, scale_inv: Tensor, dtype: torch.dtype) -> Tensor:
    """A DeepSeek-V3 fp8 checkpoint tensor `data [N, K]` with its `weight_scale_inv [ceil(N/128), ceil(K/128)]` as
    `dtype` (non-expert weights are loaded this way)."""
    return dequantize(QuantizedWeight(data, scale_inv.float(), dtype))


def weight_dtype(weight: "ExpertWeight") -> torch.dtype:
    """The dtype the weight computes in (a quantized weight's dequantized dtype)."""
    return weight.dtype


def weight_nbytes(weight: "ExpertWeight") -> int:
    """Bytes the weight holds where it lives."""
    if isinstance(weight, QuantizedWeight):
        return weight.nbytes
    return weight.numel() * weight.element_size()


def scheme_of(weight: "ExpertWeight") -> str | None:
    """`int8` / `int4` / `fp8` for a quantized weight, None for a plain tensor."""
    return weight.scheme if isinstance(weight, QuantizedWeight) else None
