"""Quantized routed experts: int8 / int4 / fp8 formats, their error bounds, the CPU kernels, and the engine passes on
them."""
from __future__ import annotations

import copy

import pytest
import torch

from kllama.experts import ExpertPlacement, HostExperts, install_expert_engine
from kllama.experts.cpu_compute import cpu_infer_forward
from kllama.experts.lora import ExpertLoRA
from kllama.errors import KllamaError
from kllama.experts.quant import (BLOCK, FP8_DECODERS, FP8_MAX, INT4_GROUP, INT8_MAX, QuantizedWeight, dequantize,
                                  pack_int4, quantize, quantize_fp8_blocks, quantize_int4, quantize_int8, scale_shape,
                                  unpack_int4)
from kllama.experts.quant_compute import QUANT_GEMMS, int8_pack_mm, quant_expert_gemm
from kllama.model.tiny import build_tiny_model

SILU = torch.nn.functional.silu


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weights(*shape: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights (std 0.02) with one outlier row per expert and one all-zero row: the cases scales meet."""
    w = torch.randn(*shape, generator=gen(seed)) * 0.02
    w[..., 1, :] *= 30.0
    w[..., 2, :] = 0.0
    return w


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", [(3, 64, 48), (2, 256, 384), (1, 300, 130)])
def test_int8_round_trip_within_half_a_step_per_row(shape: tuple[int, ...]) -> None:
    w = weights(*shape)
    q = quantize(w, "int8")
    assert q.data.dtype == torch.int8 and tuple(q.scale.shape) == shape[:-1] == scale_shape("int8", shape)
    back = dequantize(q, out=torch.empty(shape))  # fp32: the quantization error alone
    step = w.abs().amax(-1, keepdim=True) / 127
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert (back[..., 2, :] == 0).all()  # an all-zero row stays zero (scale 1, no division by 0)
    assert q.data.abs().max() == 127


@pytest.mark.parametrize("shape", [(3, 64, 48), (2, 256, 384), (1, 300, 130)])
def test_fp8_round_trip_within_e4m3_rounding(shape: tuple[int, ...]) -> None:
    # e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself; below the smallest normal
    # (2^-6 of the scale unit) the subnormal step is 2^-9, so at most 2^-10 absolute (in units of the block scale)
    w = weights(*shape)
    q = quantize(w, "fp8")
    assert q.data.dtype == torch.float8_e4m3fn
    assert tuple(q.scale.shape) == (shape[0], -(-shape[1] // BLOCK), -(-shape[2] // BLOCK))
    back = dequantize(q, out=torch.empty(shape))
    grid = q.scale.repeat_interleave(BLOCK, -2)[:, : shape[1]].repeat_interleave(BLOCK, -1)[..., : shape[2]]
    bound = torch.maximum(w.abs() * 2**-4, grid * 2**-10)
    assert ((back - w).abs() <= bound * (1 + 1e-5)).all()
    assert q.data.float().abs().max() == FP8_MAX  # each block's largest value maps to fp8's largest


def test_fused_gate_up_gets_one_block_grid_per_projection() -> None:
    # gate rows ~10^5 x larger than up rows: on one shared 128-row grid (64 + 64 rows here) the up values fall among
    # fp8's subnormals (below 2^-6 of the scale unit); with a grid per projection they keep e4m3's relative precision
    gate = torch.randn(2, 64, 256, generator=gen(1)) * 5000.0
    up = torch.randn(2, 64, 256, generator=gen(2)) * 0.02
    fused = torch.cat([gate, up], dim=1)
    q = quantize(fused, "fp8", projections=2)
    assert tuple(q.scale.shape) == (2, 2, 2) == scale_shape("fp8", (2, 128, 256), projections=2)
    back = dequantize(q, out=torch.empty(fused.shape))
    assert rel(back[:, 64:], up) < 0.04
    shared = dequantize(quantize(fused, "fp8"), out=torch.empty(fused.shape))
    assert rel(shared[:, 64:], up) > 0.5  # what the per-projection grid avoids


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_dequantize_rounds_once_to_the_compute_dtype(scheme: str) -> None:
    w = weights(2, 256, 384)
    q = quantize(w, scheme, dtype=torch.bfloat16)
    exact = dequantize(q, out=torch.empty(w.shape))  # values x scales in fp32
    got = dequantize(q)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, exact.to(torch.bfloat16))
    assert torch.equal(dequantize(q.expert(1)), got[1])


def test_fp8_decoders_are_exact_for_every_code() -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = ~codes.float().isnan()
    for name, decode in FP8_DECODERS.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(decode(codes, dtype)[finite], codes.to(dtype)[finite]), (name, dtype)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_quantizing_gives_correctly_rounded_scales_and_the_same_bytes_on_every_device(device: str) -> None:
    # CUDA divides by a Python number as a multiply by its reciprocal (one ulp off for ~half of amax / 448): a model
    # moved to the GPU and installed with expert_dtype got other scales and fp8/int8 bytes than one quantized on the
    # host. Scales must be amax / max rounded once, wherever the weight is.
    w = weights(2, 256, 384)
    blocks = w.abs().view(2, 2, BLOCK, 3, BLOCK).amax(dim=(-3, -1))  # [E, nb, kb]
    groups = w.abs().view(2, 256, 384 // INT4_GROUP, INT4_GROUP).amax(dim=-1)  # [E, N, G]
    for scheme, amax, largest in (("int8", w.abs().amax(dim=-1), INT8_MAX), ("fp8", blocks, FP8_MAX),
                                  ("int4", groups, 7.0)):
        host = quantize(w, scheme)
        here = quantize(w.to(device), scheme)
        exact = (amax.double() / largest).float()
        assert torch.equal(here.scale.cpu(), torch.where(exact > 0, exact, torch.ones_like(exact))), scheme
        assert torch.equal(here.scale.cpu(), host.scale), scheme
        assert torch.equal(here.data.cpu().view(torch.uint8), host.data.view(torch.uint8)), scheme


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_int8pack_mm_behaviour(rows: int, dtype: torch.dtype) -> None:
    # pins the private torch kernel the int8 CPU path uses: x [M, K] @ (w_int8 [N, K] * scales [N])^T with scales in
    # x's dtype, accumulated in fp32 and rounded once to x's dtype
    w = weights(96, 256)
    q, scale = quantize_int8(w)
    x = torch.randn(rows, 256, generator=gen(3)).to(dtype)
    got = torch._weight_int8pack_mm(x, q, scale.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, 96)
    w_used = q.float() * scale.to(dtype).float()[:, None]
    ref = x.float() @ w_used.T
    magnitude = x.float().abs() @ w_used.abs().T  # bounds fp32 accumulation error (order of summation differs)
    rounding = 0.0 if dtype == torch.float32 else 2**-8  # one rounding to bf16: at most half an ulp (2^-9), x2 slack
    assert ((got.float() - ref).abs() <= ref.abs() * rounding + magnitude * 1e-5).all()
    assert torch.equal(int8_pack_mm(x, QuantizedWeight(q, scale, dtype)), got)


def test_torch_int8_pack_is_used_only_where_its_avx512_loads_stay_in_bounds() -> None:
    # torch's AVX-512 _weight_int8pack_mm has no K tail and uses aligned loads: K = 200 segfaulted on the H200 box.
    # Such shapes take the dequantizing form; a row-offset (misaligned) view is copied before the call.
    from kllama.experts.quant_compute import _forms

    assert "int8-pack" not in _forms(torch.randn(3, 200).bfloat16(), "int8")
    assert "int8-pack" in _forms(torch.randn(3, 256).bfloat16(), "int8") or torch._weight_int8pack_mm is None
    w = weights(96, 256)
    q, scale = quantize_int8(w)
    x = torch.randn(5, 256, generator=gen(4)).bfloat16()
    weight = QuantizedWeight(q, scale, torch.bfloat16)
    shifted = torch.empty(5 * 256 + 8, dtype=torch.bfloat16)[8:].view(5, 256)  # 16 bytes off the allocation
    shifted.copy_(x)
    assert shifted.data_ptr() % 64 != 0
    assert torch.equal(int8_pack_mm(shifted, weight), int8_pack_mm(x, weight))


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("rows", [1, 9, 40])
def test_every_cpu_form_computes_the_dequantized_product(scheme: str, rows: int) -> None:
    w = quantize(weights(3, 160, 256), scheme, dtype=torch.bfloat16)
    x = torch.randn(rows, 256, generator=gen(4)).to(torch.bfloat16)
    ref = x.float() @ dequantize(w.expert(2)).float().T
    for name, form in QUANT_GEMMS[scheme].items():
        assert rel(form(x, w.expert(2)), ref) < 1e-2, name
    assert rel(quant_expert_gemm(x, w, 2), ref) < 1e-2


def layer(scheme: str | None, dtype: torch.dtype, seed: int = 0) -> tuple[HostExperts, HostExperts]:
    """A HostExperts layer quantized with `scheme` and its twin holding the dequantized weights (8 experts,
    hidden 64, width 32)."""
    gate_up, down = weights(8, 64, 64, seed=seed), weights(8, 64, 32, seed=seed + 1)
    q_gate_up, q_down = quantize(gate_up, scheme, projections=2, dtype=dtype), quantize(down, scheme, dtype=dtype)
    placement = ExpertPlacement.from_mode("cpu")
    quantized = HostExperts(q_gate_up, q_down, SILU, placement, "q", compute_device="cpu")
    dense = HostExperts(dequantize(q_gate_up), dequantize(q_down), SILU, placement, "d", compute_device="cpu")
    return quantized, dense


def routing(tokens: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.rand(tokens, 8, generator=gen(seed)).topk(2, dim=-1).indices
    return index, torch.rand(tokens, 2, generator=gen(seed + 1))


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_no_grad_cpu_pass_on_quantized_bytes_matches_the_dequantized_layer(scheme: str) -> None:
    quantized, dense = layer(scheme, torch.bfloat16)
    assert quantized.host_bytes() < 0.55 * dense.host_bytes()
    assert quantized.dense_bytes() == dense.host_bytes()
    for tokens in (1, 3, 40):
        index, w = routing(tokens)
        x = torch.randn(tokens, 64, generator=gen(7)).to(torch.bfloat16)
        with torch.no_grad():
            got, ref = quantized(x, index, w), dense(x, index, w)
        assert rel(got, ref) < 1e-2
        direct = cpu_infer_forward(x, index, w, *dense.host_weights(), SILU)
        torch.testing.assert_close(ref, direct, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_lora_gradients_flow_through_a_quantized_cpu_layer(scheme: str) -> None:
    # a CPU training pass dequantizes the layer for its duration: outputs and every gradient equal the layer that
    # holds the dequantized weights, and the LoRA factors get non-zero gradients
    results = []
    for module in layer(scheme, torch.float32):
        torch.manual_seed(0)
        for target, (in_f, out_f) in {"gate_up_proj": (64, 64), "down_proj": (32, 64)}.items():
            lora = ExpertLoRA(8, in_f, out_f, 4, 8.0, device=torch.device("cpu"), dtype=torch.float32)
            lora.reset_parameters(gen(11))
            with torch.no_grad():
                lora.lora_B.normal_(0, 0.1, generator=gen(12))
            module.lora[target] = lora
        index, w = routing(12)
        x = torch.randn(12, 64, generator=gen(8)).requires_grad_()
        w = w.requires_grad_()
        module(x, index, w).square().sum().backward()
        grads = [x.grad, w.grad] + [p.grad for p in module.lora.parameters()]
        results.append(grads)
    for got, ref in zip(*results):
        assert got is not None and got.abs().sum() > 0
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("scheme,tol", [("int8", 0.03), ("fp8", 0.12), ("int4", 0.4)])
def test_tiny_model_with_quantized_experts_stays_close_to_unquantized(scheme: str, tol: float) -> None:
    # Tolerance: the logits' change from quantizing the routed experts, as a fraction of their change when the routed
    # experts are removed altogether (what the experts contribute): about the weights' relative error (int8 ~0.5 %,
    # fp8 ~3.6 % RMS, int4 ~10 %: 15 levels over a group's amax); measured 1.0 % (int8), 4.6 % (fp8) and 18.5 %
    # (int4) on this model, bounds 3x that (int4 2x: a nibble order or a group scale gone wrong moves it past 100 %)
    stock = build_tiny_model("deepseek_v2", seed=0, dtype=torch.float32)
    quantized, without = copy.deepcopy(stock), copy.deepcopy(stock)
    engine = install_expert_engine(quantized, lambda name: ExpertPlacement.from_mode("cpu"), "cpu",
                                   expert_dtype=scheme)
    assert all(m.expert_dtype == scheme for m in engine.modules.values())
    for name, module in without.named_modules():
        if name.endswith("mlp.experts"):
            module.gate_up_proj.data.zero_()  # act(0) * 0 = 0: the routed experts add nothing
    ids = torch.randint(0, 2000, (2, 24), generator=gen(9))
    with torch.no_grad():
        ref, got, bare = stock(ids).logits, quantized(ids).logits, without(ids).logits
    assert 0 < (got - ref).norm() / (bare - ref).norm() < tol


# ---- int4: the packed layout the C++ kernel reads, and its rounding ------------------------------------------

def test_int4_packs_the_even_column_in_the_low_nibble_every_value_round_trips() -> None:
    # by hand: q = [-7, 7, 0, -1] -> nibbles 1, 15, 8, 7 -> bytes (15 << 4) | 1 = 0xF1, (7 << 4) | 8 = 0x78
    packed = pack_int4(torch.tensor([[-7, 7, 0, -1]]))
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF1, 0x78]]
    # all 16 nibble values in both positions: every (low, high) pair, i.e. all 256 bytes
    low, high = torch.arange(16).repeat(16), torch.arange(16).repeat_interleave(16)
    values = torch.stack((low, high), dim=-1).flatten() - 8  # [512]: column 2j = low, 2j + 1 = high
    assert torch.equal(pack_int4(values), torch.arange(256, dtype=torch.uint8))
    assert torch.equal(unpack_int4(torch.arange(256, dtype=torch.uint8)), values.to(torch.int8))
    rows = values.view(4, 128)
    assert torch.equal(unpack_int4(pack_int4(rows)), rows.to(torch.int8))


@pytest.mark.parametrize("shape", [(3, 64, 128), (2, 40, 32), (2, 40, 96), (1, 300, 130)])
def test_int4_round_trip_within_half_a_step_per_group(shape: tuple[int, ...]) -> None:
    # K = 32 (one short group), 96 (a full group and a short one), 130 (two full and one of 2 columns)
    w = weights(*shape)
    q = quantize(w, "int4")
    groups = -(-shape[-1] // INT4_GROUP)
    assert q.data.dtype == torch.uint8 and tuple(q.data.shape) == (*shape[:-1], shape[-1] // 2)
    assert tuple(q.scale.shape) == (*shape[:-1], groups) == scale_shape("int4", shape)
    assert q.scheme == "int4" and q.shape == torch.Size(shape)
    assert q.nbytes == w.numel() // 2 + 4 * w.numel() // shape[-1] * groups
    back = dequantize(q, out=torch.empty(shape))  # fp32: the quantization error alone
    step = q.scale.repeat_interleave(INT4_GROUP, dim=-1)[..., : shape[-1]]  # [..., N, K]
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5)).all()
    # each group's scale is its own amax / 7 (the short last group's from its own values, not padding)
    last = w[..., (groups - 1) * INT4_GROUP:].abs().amax(-1)  # [..., N]
    assert torch.equal(q.scale[..., -1], torch.where(last > 0, last / 7, torch.ones_like(last)))
    assert unpack_int4(q.data).abs().max() == 7  # each group's largest value maps to 7; -8 is never written


def test_the_gpu_kernel_uses_the_format_group() -> None:
    # gpu_dequant cannot import quant (quant imports it): its copy of the group size must follow the format's
    from kllama.experts import gpu_dequant

    assert gpu_dequant._INT4_GROUP == INT4_GROUP


def test_int4_zero_group_gets_scale_one_and_stays_zero() -> None:
    w = torch.randn(4, 192, generator=gen(3))
    w[1, 64:128] = 0.0  # one all-zero group in a non-zero row
    q = quantize(w, "int4")
    assert q.scale[1, 1] == 1.0 and (q.scale[1, [0, 2]] != 1.0).all()
    assert (q.scale[2, :] != 1.0).all()
    assert (dequantize(q)[1, 64:128] == 0).all()
    assert (unpack_int4(q.data)[1, 64:128] == 0).all()


def test_int4_rejects_an_odd_width_with_the_fix() -> None:
    with pytest.raises(KllamaError, match="int4 packs two input columns a byte.*33.*use expert_dtype int8 or fp8"):
        quantize(torch.randn(4, 33), "int4")


def test_int4_projections_change_no_byte() -> None:
    # scales are per row, so the fused gate_up's two projections need no grid of their own
    w = weights(2, 128, 192)
    fused, plain = quantize(w, "int4", projections=2), quantize(w, "int4")
    assert torch.equal(fused.data, plain.data) and torch.equal(fused.scale, plain.scale)
    assert fused.projections == 2
    assert torch.equal(dequantize(fused), dequantize(plain))


def test_int4_logical_shape_serves_slicing_and_landing_buffers() -> None:
    q = quantize(weights(4, 64, 96), "int4", dtype=torch.bfloat16)
    assert q.shape == (4, 64, 96) and q.expert(1).shape == (64, 96) and q.experts(1, 3).shape == (2, 64, 96)
    slot = q.empty_like("cpu")
    assert slot.matches(q) and slot.shape == q.shape and slot.nbytes == q.nbytes
    slot.copy_(q)
    assert torch.equal(dequantize(slot), dequantize(q))
    assert torch.equal(dequantize(q.expert(3)), dequantize(q)[3])


def test_int4_cpu_decode_runs_the_kernel_and_matches_the_dequantized_layer() -> None:
    # the layer as quant.quantize holds it goes to the C++ kernel (where an int4 tier passed its self-check) and agrees
    # with the dequantized layer; without the kernel, torch's pass equals the dequantized layer's bit for bit
    from kllama.experts.cpu_kernels import kernel_runs, kernel_status

    quantized, dense = layer("int4", torch.bfloat16)
    gate_up, down = quantized.host_weights()
    index, w = routing(1)
    x = torch.randn(1, 64, generator=gen(7)).to(torch.bfloat16)
    ref = cpu_infer_forward(x, index, w, *dense.host_weights(), SILU, use_kernel=False)
    torch.testing.assert_close(cpu_infer_forward(x, index, w, gate_up, down, SILU, use_kernel=False), ref,
                               rtol=0, atol=0)
    if torch.uint8 not in kernel_status().tiers:
        pytest.skip("the C++ expert kernel has no int4 path on this machine")
    assert kernel_runs(gate_up.data, down.data, SILU, 1)
    got = cpu_infer_forward(x, index, w, gate_up, down, SILU)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


def test_quantize_fp8_blocks_pads_partial_blocks_without_touching_values() -> None:
    w = weights(130, 200)
    q, scale = quantize_fp8_blocks(w)
    assert q.shape == w.shape and scale.shape == (2, 2)
    # the last partial block's scale comes from its own values only (the padding is zeros)
    assert scale[1, 1] == w[128:, 128:].abs().max() / FP8_MAX


def test_placement_table_says_how_experts_are_held() -> None:
    from kllama.experts.report import placement_table

    model = build_tiny_model("qwen3_moe", seed=0)
    engine = install_expert_engine(model, lambda name: ExpertPlacement.from_mode("cpu"), "cpu", expert_dtype="int8")
    total = placement_table(engine).splitlines()[-1]
    assert total.startswith("total (3 MoE layers), experts held int8")
    plain = install_expert_engine(build_tiny_model("qwen3_moe", seed=0), lambda name: ExpertPlacement.from_mode("cpu"),
                                  "cpu")
    assert "held" not in placement_table(plain)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_constant_quantized_weights_are_one_times_the_scale(scheme: str) -> None:
    from kllama.experts.quant import constant_quantized

    w = constant_quantized((2, 128, 64), scheme, torch.bfloat16, projections=2)
    assert w.scheme == scheme and w.projections == 2
    assert torch.equal(dequantize(w), torch.full((2, 128, 64), 0.01, dtype=torch.bfloat16))
