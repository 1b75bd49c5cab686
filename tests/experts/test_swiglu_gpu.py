"""The fused gated activation (kllama.experts.swiglu) and the fused RMSNorm on the GPU, against the eager ops.

Run on the GPU box: `pytest -q -m gpu tests/experts/test_swiglu_gpu.py`.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from kllama.experts.routed import LoraFactors, experts_backward, experts_forward, route, routed_experts_math
from kllama.experts.swiglu import eager_gated, fused_gated, fused_gated_backward
from kllama.model.fused_norm import FusedRMSNorm
from kllama.model.tiny import build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SILU = torch.nn.SiLU()


def _eager(hidden: torch.Tensor, ws: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = hidden.detach().requires_grad_(True)
    gate, up = h.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    scaled = act * ws
    d_hidden, = torch.autograd.grad(act, h, (grad * ws).to(act.dtype))
    return scaled.detach(), act.detach(), d_hidden, (grad * act.detach()).sum(-1, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "inter"), [(4096, 1408), (1, 768), (333, 300), (0, 64)])
def test_kernels_give_eager_bits(dtype: torch.dtype, rows: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(rows + inter)
    hidden = (torch.randn(rows, 2 * inter, generator=gen) * 3).to(dtype).cuda()
    ws = torch.rand(rows, 1, generator=gen).to(dtype).cuda()
    grad = torch.randn(rows, inter, generator=gen).to(dtype).cuda()
    scaled, act, d_hidden, dw = _eager(hidden, ws, grad)
    assert torch.equal(fused_gated(hidden, ws, SILU), scaled)
    got_dh, got_act, got_dw = fused_gated_backward(hidden, grad, ws, SILU, want_act=True, want_weight_grad=True)
    assert torch.equal(got_act, act)
    assert torch.equal(got_dh, d_hidden)
    # a sum of `inter` fp32 terms: only its order differs, so within a few roundings of the terms' magnitude
    bound = 1e-5 * (grad.float() * act.float()).abs().sum(-1) + 1e-6
    assert ((got_dw - dw).abs() <= bound).all()
    only_dh, no_act, no_dw = fused_gated_backward(hidden, grad, ws, SILU, want_act=False, want_weight_grad=False)
    assert torch.equal(only_dh, d_hidden) and no_act is None and no_dw is None


def test_kernels_decline_what_they_do_not_compute() -> None:
    hidden = torch.randn(8, 64, dtype=torch.bfloat16, device="cuda")
    ws = torch.rand(8, 1, dtype=torch.bfloat16, device="cuda")
    assert fused_gated(hidden, ws, torch.nn.GELU()) is None  # another activation
    assert fused_gated(hidden.float(), ws.float(), SILU) is None  # fp32 stays eager
    assert fused_gated(torch.randn(64, 8, dtype=torch.bfloat16, device="cuda").t(), ws, SILU) is None  # strided
    with eager_gated():
        assert fused_gated(hidden, ws, SILU) is None
    assert fused_gated(hidden.clone().requires_grad_(True), ws, SILU) is None  # autograd records: eager ops
    with torch.no_grad():
        assert fused_gated(hidden.clone().requires_grad_(True), ws, SILU) is not None


def test_a_graph_recorded_through_the_layer_still_differentiates() -> None:
    # routed_experts_math is differentiable in x and the routing weights: under autograd it must not take the kernel
    gen = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(4, 64, 32, generator=gen) * 0.1).bfloat16().cuda()
    down = (torch.randn(4, 32, 32, generator=gen) * 0.1).bfloat16().cuda()
    x = torch.randn(10, 32, generator=gen).bfloat16().cuda().requires_grad_(True)
    index = torch.rand(10, 4, generator=gen).topk(2, dim=-1).indices.cuda()
    weights = torch.rand(10, 2, generator=gen).cuda().requires_grad_(True)
    routed_experts_math(x, index, weights, gate_up, down, SILU).float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def test_layer_forward_and_backward_match_the_eager_ops() -> None:
    # a whole routed-experts layer with expert LoRA on both projections: the kernels against eager_gated()
    gen = torch.Generator().manual_seed(0)
    experts, hidden_dim, inter, tokens, top_k = 8, 256, 192, 300, 3
    gate_up = (torch.randn(experts, 2 * inter, hidden_dim, generator=gen) * 0.05).bfloat16().cuda()
    down = (torch.randn(experts, hidden_dim, inter, generator=gen) * 0.05).bfloat16().cuda()
    lora = {t: LoraFactors((torch.randn(experts * 4, n_in, generator=gen) * 0.1).cuda(),
                           (torch.randn(n_out, experts * 4, generator=gen) * 0.1).cuda(), 0.5)
            for t, (n_in, n_out) in {"gate_up_proj": (hidden_dim, 2 * inter), "down_proj": (inter, hidden_dim)}.items()}
    meta = [(t, f.scaling) for t, f in lora.items()]
    params = [p for f in lora.values() for p in (f.lora_A, f.lora_B)]
    x = torch.randn(tokens, hidden_dim, generator=gen).bfloat16().cuda()
    index = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=-1).indices.cuda()
    weights = torch.rand(tokens, top_k, generator=gen).cuda()
    grad_out = torch.randn(tokens, hidden_dim, generator=gen).bfloat16().cuda()
    routing = route(index, experts)
    results = []
    for eager in (True, False):
        with eager_gated() if eager else nullcontext():
            with torch.no_grad():
                out, hidden = experts_forward(x, routing, weights, gate_up, down, SILU, lora)
            grads = experts_backward(x, routing, weights, hidden, gate_up, down, SILU, meta, params, grad_out,
                                     [True, True, True, True, True, True])
        results.append((out, grads))
    (out_e, grads_e), (out_f, grads_f) = results
    assert torch.equal(out_f, out_e)
    assert torch.equal(grads_f[0], grads_e[0])  # x
    assert torch.allclose(grads_f[1], grads_e[1], rtol=1e-3, atol=1e-5)  # routing weights: a sum's order
    for got, want in zip(grads_f[2:], grads_e[2:]):  # LoRA factors
        assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_fused_norm_stays_within_a_rounding_of_transformers(arch: str) -> None:
    # CUDA's fused rms_norm sums the squares in its own order: the variance may differ in its last bits, so an
    # output differs by at most one bf16 rounding step, rarely
    stock = next(m for m in build_tiny_model(arch, seed=0, dtype=torch.bfloat16).cuda().modules()
                 if type(m).__name__.endswith("RMSNorm"))
    with torch.no_grad():
        stock.weight.copy_(torch.randn(stock.weight.shape, device="cuda") + 1)
    fused = FusedRMSNorm(torch.nn.Parameter(stock.weight.detach().clone()), stock.variance_epsilon)
    x = torch.randn(4096, stock.weight.shape[0], device="cuda").bfloat16() * 3
    grad = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_stock, out_fused = stock(a), fused(b)
    out_stock.backward(grad)
    out_fused.backward(grad)
    assert (out_fused == out_stock).float().mean() > 0.99
    step = out_stock.float().abs() * 2**-7  # one bf16 rounding step (8 bits of mantissa)
    assert ((out_fused.float() - out_stock.float()).abs() <= step + 1e-6).all()
    assert ((b.grad.float() - a.grad.float()).norm() / a.grad.float().norm()) < 1e-2
