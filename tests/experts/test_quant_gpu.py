"""Quantized experts on the GPU targets: streamed and resident passes dequantize on the device.

Run on the GPU box: `.venv/bin/pytest -q -m gpu tests/experts/test_quant_gpu.py`.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kllama.experts import (ExpertEngine, ExpertLoraSet, ExpertPlacement, HostExperts, find_expert_modules,
                            install_expert_engine)
from kllama.experts.gpu_dequant import fused_dequantize
from kllama.experts.quant import BLOCK, QuantizedWeight, dequantize, quantize
from kllama.model.tiny import build_tiny_model

from expert_helpers import rel, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("shape", [{}, {"hidden_size": 256, "moe_intermediate_size": 128}])
def test_gpu_dequantization_gives_the_cpu_bytes(scheme: str, shape: dict) -> None:
    # the blocked fast path (dims multiples of 128) and the general one, on the device, bit for bit
    model = build_tiny_model("deepseek_v2", seed=0, dtype=torch.bfloat16, **shape)
    stock = next(iter(find_expert_modules(model).values()))
    for weight, projections in ((stock.gate_up_proj.detach(), 2), (stock.down_proj.detach(), 1)):
        q = quantize(weight, scheme, projections=projections)
        on_gpu = q.to("cuda")
        out = torch.empty(weight.shape, dtype=torch.bfloat16, device="cuda")
        assert torch.equal(dequantize(on_gpu, out=out).cpu(), dequantize(q))
        assert torch.equal(dequantize(on_gpu).cpu(), dequantize(q))



@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
@pytest.mark.parametrize(("experts", "rows", "cols", "projections"), [
    (64, 2816, 2048, 2),  # V2-Lite gate_up (2 x 1408 rows: 11 blocks each)
    (4, 2048, 1408, 1),  # V2-Lite down
    (3, 192, 200, 2),  # projections of 96 rows (a partial block row each), a partial block column
    (2, 40, 136, 1),  # int8 / int4: rows not a multiple of the kernel's 32-row tile
    (3, 40, 96, 1),  # int4: a short last group (32 columns), a partial 64-byte tile
])
def test_the_triton_kernel_gives_the_torch_bits(scheme: str, experts: int, rows: int, cols: int,
                                                projections: int) -> None:
    # the fused kernel against torch's forms of the same arithmetic (fp32 product, one rounding), computed on the CPU
    gen = torch.Generator().manual_seed(rows + cols)
    weight = torch.randn(experts, rows, cols, generator=gen).mul_(0.02).bfloat16()
    q = quantize(weight, scheme, projections=projections)
    on_gpu = q.to("cuda")
    out = torch.full(weight.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    applies = scheme in ("int8", "int4") or (rows // projections) % 32 == 0
    assert fused_dequantize(on_gpu.data, on_gpu.scale, projections, BLOCK, out) is applies
    expected = dequantize(q)
    if applies:
        assert torch.equal(out.cpu(), expected)
    assert torch.equal(dequantize(on_gpu, out=torch.empty_like(out)).cpu(), expected)  # fused or torch's fallback


def test_the_kernel_declines_what_it_does_not_cover() -> None:
    # the torch path takes these: CPU tensors, a non-contiguous output, fp8 projections of 40 rows, an int4 output
    # of the packed shape
    weight = torch.randn(2, 80, 128).bfloat16()
    q = quantize(weight, "fp8", projections=2)
    assert not fused_dequantize(q.data, q.scale, 2, BLOCK, torch.empty_like(weight))  # on the CPU
    on_gpu = q.to("cuda")
    assert not fused_dequantize(on_gpu.data, on_gpu.scale, 2, BLOCK, torch.empty(2, 128, 80).cuda().bfloat16().mT)
    assert not fused_dequantize(on_gpu.data, on_gpu.scale, 2, BLOCK, torch.empty_like(weight, device="cuda"))
    assert torch.equal(dequantize(on_gpu).cpu(), dequantize(q))
    # int4: an output of the packed values' shape is not the weight's (`out` has the logical shape [..., N, K])
    packed = quantize(weight, "int4").to("cuda")
    assert not fused_dequantize(packed.data, packed.scale, 1, BLOCK, torch.empty(packed.data.shape).cuda().bfloat16())
    assert fused_dequantize(packed.data, packed.scale, 1, BLOCK, torch.empty_like(weight, device="cuda"))


def device_weights(engine: ExpertEngine, module: HostExperts, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU weights a `mode` pass of `module` computes with (a stream slot after its copy, or the resident copy),
    as host copies."""
    if mode == "gpu":
        return tuple(w.cpu() for w in module.resident_weights())
    weights = tuple(w.cpu() for w in engine.streamer.acquire(module, 1, backward=False))
    engine.streamer.release(module)
    return weights


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("mode", ["stream", "gpu"])
def test_gpu_pass_on_quantized_experts_equals_the_dequantized_layer(scheme: str, mode: str) -> None:
    # a streamed / resident pass on quantized host weights (forward, backward, expert LoRA grads) equals the same
    # pass on host weights that were dequantized on the CPU: the GPU computes with the very bytes the CPU dequantizes
    # (the model is quantized where it is, on the GPU, so this also needs quantization to be device-independent)
    base = build_tiny_model("deepseek_v2", seed=0, dtype=torch.bfloat16, hidden_size=256,
                            moe_intermediate_size=128).cuda()
    # eager attention: sdpa's backward on CUDA (memory-efficient kernel, MLA's unequal head dims rule out flash)
    # accumulates with atomics, run-to-run noise that bf16 turns into ~1e-3 relative gradient differences
    base.set_attn_implementation("eager")
    quantized, dense = copy.deepcopy(base), copy.deepcopy(base)
    for module in find_expert_modules(dense).values():
        with torch.no_grad():
            module.gate_up_proj.copy_(dequantize(quantize(module.gate_up_proj.detach().cpu(), scheme, projections=2)))
            module.down_proj.copy_(dequantize(quantize(module.down_proj.detach().cpu(), scheme)))
    embeds = torch.randn(2, 16, 256, device="cuda", dtype=torch.bfloat16,
                         generator=torch.Generator("cuda").manual_seed(2))
    engines, results = [], []
    for model, held in ((quantized, scheme), (dense, None)):
        engine = install_expert_engine(model, lambda name: ExpertPlacement.from_mode(mode), "cuda", trace=True,
                                       expert_dtype=held)
        assert all(isinstance(m.host_weights()[0], QuantizedWeight) == (held is not None)
                   for m in engine.modules.values())
        torch.manual_seed(0)
        ExpertLoraSet(model).add(r=8, alpha=16, dtype=torch.bfloat16)
        with torch.no_grad():
            for m in engine.modules.values():
                for lora in m.lora.values():
                    lora.lora_B.normal_(std=0.3, generator=torch.Generator("cuda").manual_seed(1))
        results.append(run(model, embeds))
        engines.append(engine)
        if mode == "stream":
            assert engine.streamer.copies
            landing = sum(m.host_bytes() for m in list(engine.modules.values())[:1]) if held else 0
            assert engine.streamer.gpu_bytes() == 2 * next(iter(engine.modules.values())).dense_bytes() + landing
    # the weights the GPU computed with, bit for bit
    for held_module, dense_module in zip(engines[0].modules.values(), engines[1].modules.values()):
        got = device_weights(engines[0], held_module, mode)
        assert all(torch.equal(g, w) for g, w in zip(got, dense_module.host_weights())), held_module.name
    # the same pass again on the dense model measures the GPU's own run-to-run noise (0 where every kernel is
    # deterministic); the passes may differ by that and no more, far below what a wrong dequantization or a slot read
    # before its copy landed moves (int8 ~1e-2, fp8 ~5e-2, int4 ~2e-1, a stale slot ~1)
    dense.zero_grad(set_to_none=True)
    again = run(dense, embeds)
    (l1, g1, p1), (l2, g2, p2) = results
    noise = max([rel(again[0], l2), rel(again[1], g2)] + [rel(again[2][n], p2[n]) for n in p2])
    bound = 1e-3 + 4 * noise
    print(f"{mode}-{scheme}: run-to-run noise {noise:.2e}, bound {bound:.2e}")
    assert rel(l1, l2) < bound and rel(g1, g2) < bound
    assert any("lora_" in n for n in p2) and all(rel(p1[n], p2[n]) < bound for n in p2)


def test_quantized_resident_layers_are_dense_on_the_gpu() -> None:
    model = build_tiny_model("qwen3_moe", seed=0, dtype=torch.bfloat16).cuda()
    engine = install_expert_engine(model, lambda name: ExpertPlacement.from_mode("gpu"), "cuda", expert_dtype="fp8")
    module = next(iter(engine.modules.values()))
    gate_up, down = module.resident_weights()
    assert gate_up.is_cuda and gate_up.dtype == torch.bfloat16
    assert torch.equal(gate_up.cpu(), dequantize(module.host_weights()[0]))
    assert module.gpu_bytes() == module.dense_bytes() > module.host_bytes()
