"""CPU products with quantized routed experts: `x [n, K] @ W_e^T` reading expert e's int8, int4 or fp8 bytes.

No-grad CPU passes read one expert's weights per product, so their cost is the bytes read: int8 and fp8 halve them,
int4 quarters them. Passes of up to 64 tokens run in the C++ expert kernel (`cpu_kernels.py`, int8 and fp8 alike;
int4 once the kernel reads it); the rest (larger prefills, or where the kernel is unavailable) come here. How to turn those bytes into a product is a kernel choice
made here, measured per shape:

* int8: torch's weight-only int8 kernel `torch._weight_int8pack_mm(x, w_int8 [N, K], scales [N])` (private API; its
  behaviour is pinned by tests/experts/test_quant.py: `x @ (w * scales)^T`, scales in x's dtype, fp32 accumulation),
  or the expert dequantized to x's dtype and multiplied by `linear`. The first reads 1 byte per weight and wins
  decode; the second may win for many rows where the bf16 GEMM has AMX and the int8 kernel has not.
* fp8: the expert dequantized (exact fp8 decode, block scales in fp32, one rounding) and multiplied by `linear`.
  torch has no fp8 CPU GEMM and decoding costs more than reading bf16 on CPUs whose torch build does not vectorise
  the fp8 cast, so on this path int8 is the faster CPU format (benchmarks/NOTES.md has the numbers).
* int4: the expert dequantized (nibbles unpacked, group scales in fp32, one rounding) and multiplied by `linear`;
  torch has no CPU kernel for this layout (its int4 weight-only kernels want their own packing and asymmetric
  scales), so only this form.

Every form computes the same dot products with fp32 accumulation; the choice is measured once per (scheme, row
bucket, shape, dtype, thread count) against every expert of the layer in turn, so the weights come from memory as
in a decode step (timing one repeated expert measures a cache-resident weight and can pick the wrong form).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.functional import linear

from kllama.experts.quant import QuantizedWeight, dequantize

_INT8_PACK = getattr(torch, "_weight_int8pack_mm", None)
_PACK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# torch's AVX-512 `_weight_int8pack_mm` (aten/src/ATen/native/cpu/int8mm_kernel.cpp) walks K in steps of 16 with
# aligned vector loads of the activation rows (32 bytes) and the weight rows (16 bytes) and no tail: K not a multiple
# of 16 or a misaligned row reads past the rows -- a segfault on the H200 box (K = 200 in a kernel test).
_PACK_K_MULTIPLE = 16
_PACK_ALIGN = 64


def _aligned(t: Tensor) -> Tensor:
    return t if t.data_ptr() % _PACK_ALIGN == 0 else t.clone()  # a fresh allocation is 64-byte aligned


def int8_pack_mm(x: Tensor, weight: QuantizedWeight) -> Tensor:
    """`x [n, K] @ (data * scale)^T -> [n, N]` through torch's int8 weight-only kernel (one expert, scales cast to
    x's dtype as the kernel requires); only for K a multiple of 16 (`_forms` leaves it out otherwise), rows aligned
    as the kernel's vector loads need."""
    return _INT8_PACK(_aligned(x.contiguous()), _aligned(weight.data), weight.scale.to(x.dtype))


def dequant_mm(x: Tensor, weight: QuantizedWeight) -> Tensor:
    """`x [n, K] @ W^T -> [n, N]` with W dequantized to x's dtype for this product."""
    return linear(x, dequantize(weight).to(x.dtype))


QUANT_GEMMS: dict[str, dict[str, Callable[[Tensor, QuantizedWeight], Tensor]]] = {
    "int8": {"int8-pack": int8_pack_mm, "dequant": dequant_mm},
    "fp8": {"dequant": dequant_mm},
    "int4": {"dequant": dequant_mm},
}
_CHOSEN: dict[tuple, str] = {}


def _forms(x: Tensor, scheme: str) -> dict[str, Callable[[Tensor, QuantizedWeight], Tensor]]:
    forms = dict(QUANT_GEMMS[scheme])
    if _INT8_PACK is None or x.dtype not in _PACK_DTYPES or x.shape[-1] % _PACK_K_MULTIPLE:
        forms.pop("int8-pack", None)
    return forms


def fastest_quant_gemm(x: Tensor, weights: QuantizedWeight, repeats: int = 3) -> str:
    """The name of the QUANT_GEMMS form of `weights`' scheme with the lowest median time for `x` against every
    expert of the batched `weights [E, N, K]` in turn (after a warm-up each): the rotation makes the weights come from
    memory as they do in a decode step, not from a cache one repeated expert would sit in."""
    forms = _forms(x, weights.scheme)
    if len(forms) == 1:
        return next(iter(forms))
    experts = [weights.expert(e) for e in range(weights.shape[0])]
    times: dict[str, list[float]] = {name: [] for name in forms}
    for fn in forms.values():
        fn(x, experts[0])
    for _ in range(repeats):
        for name, fn in forms.items():
            start = time.perf_counter()
            for weight in experts:
                fn(x, weight)
            times[name].append(time.perf_counter() - start)
    return min(times, key=lambda name: statistics.median(times[name]))


def quant_expert_gemm(x: Tensor, weights: QuantizedWeight, expert: int) -> Tensor:
    """`x [n, K] @ W_expert^T -> [n, N]` (x's dtype) for a batched quantized `weights [E, N, K]`, in the form
    measured fastest here for this scheme, shape, dtype, thread count and row bucket (1, up to 16, more)."""
    rows = x.shape[0]
    key = (weights.scheme, 1 if rows == 1 else 16 if rows <= 16 else 17, tuple(weights.shape), x.dtype,
           torch.get_num_threads())
    name = _CHOSEN.get(key)
    if name is None:
        name = _CHOSEN[key] = fastest_quant_gemm(x, weights)
    return QUANT_GEMMS[weights.scheme][name](x, weights.expert(expert))
