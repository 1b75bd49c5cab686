"""The no-grad CPU pass (decode, small batches, prefill) computes what the shared expert math computes."""
from __future__ import annotations

import pytest
import torch

from kllama.experts import ExpertPlacement, HostExperts
from kllama.experts.cpu_compute import cpu_infer_forward, expert_gemm, expert_groups
from kllama.experts.lora import ExpertLoRA
from kllama.experts.routed import LoraFactors, expert_factors, routed_experts_math

E, H, I = 8, 32, 24  # noqa: E741


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def routing(tokens: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(tokens, E, generator=gen).topk(top_k, dim=-1).indices,
            torch.rand(tokens, top_k, generator=gen))


def test_expert_groups_cover_every_row_once() -> None:
    for tokens in (1, 5, 400):  # 400 x 2 rows: past the Python grouping, through the sort
        index, _ = routing(tokens, 2, tokens)
        groups = expert_groups(index)
        assert [e for e, _ in groups] == sorted(set(index.view(-1).tolist()))
        rows = torch.cat([r for _, r in groups])
        assert sorted(rows.tolist()) == list(range(tokens * 2))
        assert all((index.view(-1)[r] == e).all() for e, r in groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 400])
@pytest.mark.parametrize("with_lora", [False, True])
def test_cpu_infer_forward_matches_the_expert_math(dtype: torch.dtype, tokens: int, with_lora: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) * 0.2).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) * 0.2).to(dtype)
    x = torch.randn(tokens, H, generator=gen).to(dtype)
    index, weights = routing(tokens, 2, 1)
    lora, factors = {}, {}
    if with_lora:
        for target, (n_in, n_out) in {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}.items():
            lora[target] = LoraFactors(torch.randn(E * 4, n_in, generator=gen) * 0.3,
                                       torch.randn(n_out, E * 4, generator=gen) * 0.3, 0.5)
            factors[target] = expert_factors(lora[target], E, dtype)
    silu = torch.nn.functional.silu
    expected = routed_experts_math(x, index, weights, gate_up, down, silu, lora)
    got = cpu_infer_forward(x, index, weights, gate_up, down, silu, factors)
    assert got.dtype == x.dtype and got.shape == expected.shape
    assert rel(got, expected) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_no_grad_pass_with_lora_equals_the_training_forward_and_follows_adapter_changes() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = HostExperts(torch.randn(E, 2 * I, H, generator=gen) * 0.2, torch.randn(E, H, I, generator=gen) * 0.2,
                        torch.nn.SiLU(), ExpertPlacement.from_mode("cpu"), "model.layers.1.mlp.experts",
                        compute_device="cpu")
    lora = ExpertLoRA(E, I, H, 8, 16, device=torch.device("cpu"), dtype=torch.float32)  # down: linear in B
    lora.reset_parameters(gen)
    with torch.no_grad():
        lora.lora_B.normal_(generator=gen)
    layer.lora["down_proj"] = lora
    x = torch.randn(6, H, generator=gen)
    index, weights = routing(6, 2, 2)
    with torch.no_grad():
        no_grad = layer(x, index, weights)
    training = layer(x.clone().requires_grad_(), index, weights)  # the saved-activation path
    assert rel(no_grad, training.detach()) < 1e-6
    with torch.no_grad():
        lora.lora_B.mul_(2)  # the cached host factors must notice (version counter)
        doubled = layer(x, index, weights)
        layer.lora_enabled = False
        base = layer(x, index, weights)
    assert rel(doubled - base, 2 * (no_grad - base)) < 1e-5


@pytest.mark.parametrize("rows", [1, 5])
def test_expert_gemm_is_x_times_the_weight_transposed(rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 32, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 32, generator=gen).to(torch.bfloat16)
    got = expert_gemm(x, weight)
    assert got.shape == (rows, 48) and got.dtype == torch.bfloat16
    assert rel(got, x.float() @ weight.float().T) < 1e-2
