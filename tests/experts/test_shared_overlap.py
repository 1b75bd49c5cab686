"""A DeepSeek block's shared experts computed inside its routed pass (`shared_overlap.py`) give the stock result,
only for the block's own input in the same call, and only without gradients."""
from __future__ import annotations

import copy

import torch

from kllama.experts import ExpertPlacement, install_expert_engine
from kllama.model.tiny import build_tiny_model


def engine_pair(arch: str):  # noqa: ANN201
    stock = build_tiny_model(arch, seed=0, dtype=torch.bfloat16)
    ours = copy.deepcopy(stock)
    engine = install_expert_engine(ours, lambda name: ExpertPlacement.from_mode("cpu"), "cpu")
    return stock, ours, engine


def test_deepseek_no_grad_passes_compute_shared_experts_inside_the_routed_pass() -> None:
    stock, ours, engine = engine_pair("deepseek_v2")
    overlaps = [m.shared_overlap for m in engine.modules.values()]
    assert overlaps and all(o is not None for o in overlaps)
    ids = torch.tensor([[5, 9, 3, 7, 11]])
    with torch.no_grad():
        got = ours(ids).logits
        answer = ours.generate(ids, max_new_tokens=4, do_sample=False)
    assert all(o.launches == 1 + 4 for o in overlaps)  # the forward, then generate: the prompt and 3 more steps
    for module in engine.modules.values():  # the same model computing its shared experts where the block does
        module.shared_overlap = None
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, got)  # the held result is the stock forward on the same input
        assert torch.equal(ours.generate(ids, max_new_tokens=4, do_sample=False), answer)
        assert torch.allclose(stock(ids).logits, got, rtol=5e-2, atol=5e-2)
    assert all(o.launches == 5 for o in overlaps)


def test_passes_with_gradients_leave_shared_experts_to_the_block() -> None:
    stock, ours, engine = engine_pair("deepseek_v3")
    ids = torch.tensor([[2, 4, 6]])
    ref = stock(ids).logits
    got = ours(ids).logits
    got.float().square().mean().backward()
    assert torch.allclose(ref, got, rtol=2e-2, atol=2e-2)
    assert all(m.shared_overlap.launches == 0 for m in engine.modules.values())
    shared = [p for n, p in ours.named_parameters() if "shared_experts" in n]
    assert shared and all(p.grad is not None for p in shared)


def test_a_held_result_serves_only_the_blocks_own_input_within_one_call() -> None:
    _, ours, engine = engine_pair("deepseek_v2")
    name = next(iter(engine.modules))
    overlap = engine.modules[name].shared_overlap
    block = ours.get_submodule(name.rpartition(".")[0])
    x = torch.randn(1, 3, ours.config.hidden_size, dtype=torch.bfloat16)
    other = torch.randn_like(x)
    with torch.no_grad():
        block(x)
        assert overlap.launches == 1
        overlap.launch()  # outside a block call the input is unknown: nothing computed or held
        assert overlap.launches == 1
        # a call with another tensor than the block's input computes its own result
        assert torch.equal(overlap.shared(other), overlap._stock_forward(other))


def test_families_that_call_shared_experts_first_or_have_none_get_no_overlap() -> None:
    for arch in ("qwen2_moe", "qwen3_moe", "mixtral"):
        _, _, engine = engine_pair(arch)
        assert all(m.shared_overlap is None for m in engine.modules.values()), arch
