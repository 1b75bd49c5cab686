"""Quantized experts on the GPU targets: streamed and resident passes dequantize on the device.

Run on the GPU box: `.venv/bin/pytest -q -m gpu tests/experts/test_quant_gpu.py`.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kllama.experts import ExpertLoraSet, ExpertPlacement, find_expert_modules, install_expert_engine
from kllama.experts.quant import QuantizedWeight, dequantize, quantize
from kllama.model.tiny import build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(model: torch.nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    leaf = embeds.clone().requires_grad_()
    logits = model(inputs_embeds=leaf).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), leaf.grad, grads


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
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


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("mode", ["stream", "gpu"])
def test_gpu_pass_on_quantized_experts_equals_the_dequantized_layer(scheme: str, mode: str) -> None:
    # a streamed / resident pass on quantized host weights (forward, backward, expert LoRA grads) equals the same
    # pass on host weights that were dequantized on the CPU: the GPU dequantizes to the same bytes
    base = build_tiny_model("deepseek_v2", seed=0, dtype=torch.bfloat16, hidden_size=256,
                            moe_intermediate_size=128).cuda()
    quantized, dense = copy.deepcopy(base), copy.deepcopy(base)
    for module in find_expert_modules(dense).values():
        with torch.no_grad():
            module.gate_up_proj.copy_(dequantize(quantize(module.gate_up_proj.detach().cpu(), scheme, projections=2)))
            module.down_proj.copy_(dequantize(quantize(module.down_proj.detach().cpu(), scheme)))
    results = []
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
        embeds = torch.randn(2, 16, 256, device="cuda", dtype=torch.bfloat16,
                             generator=torch.Generator("cuda").manual_seed(2))
        results.append(run(model, embeds))
        if mode == "stream":
            assert engine.streamer.copies
            landing = sum(m.host_bytes() for m in list(engine.modules.values())[:1]) if held else 0
            assert engine.streamer.gpu_bytes() == 2 * next(iter(engine.modules.values())).dense_bytes() + landing
    (l1, g1, p1), (l2, g2, p2) = results
    # same weights, same kernels: equal up to the GPU's non-deterministic reductions (attention backward), far below
    # what a wrong dequantization moves (int8 ~1e-2, fp8 ~5e-2)
    assert rel(l1, l2) < 1e-3 and rel(g1, g2) < 1e-3
    assert any("lora_" in n for n in p2) and all(rel(p1[n], p2[n]) < 1e-3 for n in p2)


def test_quantized_resident_layers_are_dense_on_the_gpu() -> None:
    model = build_tiny_model("qwen3_moe", seed=0, dtype=torch.bfloat16).cuda()
    engine = install_expert_engine(model, lambda name: ExpertPlacement.from_mode("gpu"), "cuda", expert_dtype="fp8")
    module = next(iter(engine.modules.values()))
    gate_up, down = module.resident_weights()
    assert gate_up.is_cuda and gate_up.dtype == torch.bfloat16
    assert torch.equal(gate_up.cpu(), dequantize(module.host_weights()[0]))
    assert module.gpu_bytes() == module.dense_bytes() > module.host_bytes()
