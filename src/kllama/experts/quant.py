"""Routed-expert weights held quantized in host memory: int8 per output channel, fp8 e4m3 in 128x128 blocks.

A `QuantizedWeight` stands for one fused expert projection `[E, N, K]` (N output channels, K inputs) as `data` of
that shape in int8 or float8_e4m3fn plus fp32 `scale`s, `weight ~= data * scale`:

* int8 (symmetric, per output channel): `scale [E, N] = amax(|row|) / 127`, values rounded to nearest;
* fp8 (e4m3fn, per 128x128 block): `scale [E, P * ceil(N / P / 128), ceil(K / 128)] = amax(|block|) / 448`, the
  layout of DeepSeek-V3's `weight_scale_inv`. `P` (`projections`) is the number of projections fused along N, each
  with its own block grid: 2 for `gate_up` (gate rows, then up rows, as the checkpoint stores them separately), 1 for
  `down`. With N / P a multiple of 128 the grid is the plain 128-row grid of the fused weight.

Why these two (docs/design.md, "Quantized routed experts"): int8 per channel is the format torch has a CPU kernel for
(`torch._weight_int8pack_mm`, decode); fp8 blocks are the format fp8 checkpoints ship in, read without a round trip
through bf16. Both halve the bytes of bf16 in host RAM and over PCIe. `dequantize` turns either into the compute
dtype (`dtype`, the model's weights dtype) with one rounding, on whatever device the weight is. Quantizing gives
the same bytes on the CPU and on a GPU (a model quantized where it was loaded equals one quantized on the host).
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

# Config values of `expert_dtype`: auto keeps the checkpoint's own format (fp8 for fp8 checkpoints, else unquantized).
EXPERT_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp8", "int8")
QUANT_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
BLOCK = 128  # fp8 block edge (rows and columns), as DeepSeek-V3's weight_block_size [128, 128]
INT8_MAX = 127.0
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


@dataclass
class QuantizedWeight:
    """One (possibly batched) weight `[..., N, K]` stored quantized; see the module docstring for `scale`'s shape."""

    data: Tensor  # [..., N, K] int8 | float8_e4m3fn
    scale: Tensor  # float32: int8 [..., N]; fp8 [..., P * ceil(N/P/128), ceil(K/128)]
    dtype: torch.dtype  # the dtype `dequantize` returns (the model's weights dtype)
    projections: int = 1  # fp8: projections fused along N, each with its own block grid

    @property
    def scheme(self) -> str:
        """`int8` or `fp8`."""
        return "int8" if self.data.dtype == torch.int8 else "fp8"

    @property
    def shape(self) -> torch.Size:
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
    if rows % projections:
        raise ValueError(f"{rows} rows do not split into {projections} projections")
    return (*lead, projections * math.ceil(rows // projections / BLOCK), math.ceil(cols / BLOCK))


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
    """One projection `[..., N, K]` quantized with `scheme` (`int8` | `fp8`)."""
    return _QUANTIZERS[scheme](weight)


_QUANTIZERS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "int8": quantize_int8, "fp8": quantize_fp8_blocks}


def quantize(weight: Tensor, scheme: str, *, projections: int = 1, dtype: torch.dtype | None = None,
             ) -> QuantizedWeight:
    """`weight [..., N, K]` as a QuantizedWeight with `scheme`; `projections` equal row groups get their own fp8
    block grids (2 for a fused gate_up); `dtype` (default the weight's) is what it dequantizes to."""
    if scheme not in _QUANTIZERS:
        raise ValueError(f"unknown quantization scheme {scheme!r}; one of {', '.join(_QUANTIZERS)}")
    dtype = dtype or weight.dtype
    if scheme == "int8" or projections == 1:
        data, scale = quantize_projection(weight, scheme)
        return QuantizedWeight(data, scale, dtype, projections)
    parts = [quantize_projection(part, scheme) for part in weight.chunk(projections, dim=-2)]
    return QuantizedWeight(torch.cat([p[0] for p in parts], dim=-2), torch.cat([p[1] for p in parts], dim=-2),
                           dtype, projections)


def constant_quantized(shape: tuple[int, ...], scheme: str, dtype: torch.dtype, projections: int = 1,
                       ) -> QuantizedWeight:
    """A QuantizedWeight of `shape` whose every value is 1 x scale 0.01 (no full-precision tensor is made): timing
    probes, where values do not change the cost."""
    one = {"int8": torch.ones(shape, dtype=torch.int8),
           "fp8": torch.full(shape, 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)}[scheme]  # 0x38 = 1.0
    return QuantizedWeight(one, torch.full(scale_shape(scheme, shape, projections), 0.01), dtype, projections)


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


def dequantize(weight: "ExpertWeight", out: Tensor | None = None, *, kernel: bool = True) -> Tensor:
    """The weight in its compute dtype on its device (a plain tensor is returned as it is); written into `out`
    (contiguous, same shape) when given. One rounding: values times scales are formed in fp32. On a CUDA device one
    Triton kernel does it (`gpu_dequant`) unless `kernel` is False (torch's ops: the benchmarks' baseline)."""
    if not isinstance(weight, QuantizedWeight):
        return weight if out is None else out.copy_(weight)
    if out is None and weight.device.type == "cuda":
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if kernel and out is not None and fused_dequantize(weight.data, weight.scale, weight.projections, BLOCK, out):
        return out  # one Triton kernel on a GPU (the same bits as the torch forms below, ~5-10x faster)
    if weight.scheme == "int8":
        if out is None:
            out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        torch.mul(weight.data, weight.scale.unsqueeze(-1), out=out)  # int8 * fp32 computed in fp32
        return out
    if out is not None and weight.device.type != "cpu":
        out.copy_(weight.data)  # fp8 -> bf16/fp16/fp32 is exact
    else:
        decoded = decode_fp8(weight.data, weight.dtype if out is None else out.dtype)
        out = decoded if out is None else out.copy_(decoded)
    _scale_blocks_(out, weight.scale, weight.projections)  # in place, times fp32 scales: formed in fp32, one rounding
    return out


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
    """`int8` / `fp8` for a quantized weight, None for a plain tensor."""
    return weight.scheme if isinstance(weight, QuantizedWeight) else None
