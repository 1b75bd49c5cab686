"""The expert engine reproduces stock transformers (outputs and gradients) for every supported family."""
from __future__ import annotations

import copy

import pytest
import torch

from kllama.errors import KllamaError
from kllama.experts import ExpertPlacement, HostExperts, find_expert_modules, install_expert_engine
from kllama.model.tiny import build_tiny_model

FAMILY_ARCHS = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative difference of a against the reference b."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(model: torch.nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and input-embedding grads of a loss that touches every logit."""
    leaf = embeds.clone().requires_grad_()
    logits = model(inputs_embeds=leaf).logits
    logits.float().square().mean().backward()
    return logits.detach(), leaf.grad


def pair(arch: str, placement: ExpertPlacement, dtype: torch.dtype = torch.float32):  # noqa: ANN201
    stock = build_tiny_model(arch, seed=0, dtype=dtype)
    ours = copy.deepcopy(stock)
    engine = install_expert_engine(ours, lambda name: placement, "cpu")
    return stock, ours, engine


def assert_matches(stock: torch.nn.Module, ours: torch.nn.Module, dtype: torch.dtype, tokens: int = 7) -> None:
    embeds = (torch.randn(2, tokens, stock.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5)
    logits_ref, grad_ref = run(stock, embeds.to(dtype))
    logits, grad = run(ours, embeds.to(dtype))
    tol = TOL[dtype]
    assert rel(logits, logits_ref) < tol
    assert rel(grad, grad_ref) < tol
    ref_params = dict(stock.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():  # router, shared experts, attention, embeddings: all but experts
        if ref_params[name].grad is not None and ref_params[name].grad.abs().sum() > 0:
            assert param.grad is not None, name
            assert rel(param.grad, ref_params[name].grad) < tol, name
            compared += 1
    assert any(".gate." in n or "router" in n for n, p in ours.named_parameters() if p.grad is not None)
    assert compared > 5


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_cpu_engine_matches_stock_fp32(arch: str) -> None:
    stock, ours, engine = pair(arch, ExpertPlacement.from_mode("cpu", cpu_threads=1))
    assert all(isinstance(m, HostExperts) for m in engine.modules.values())
    assert not any("experts.gate_up_proj" in n for n, _ in ours.named_parameters())
    assert_matches(stock, ours, torch.float32)


@pytest.mark.parametrize("arch", ["deepseek_v2", "mixtral"])
def test_cpu_engine_matches_stock_bf16(arch: str) -> None:
    stock, ours, _ = pair(arch, ExpertPlacement.from_mode("cpu"), torch.bfloat16)
    assert_matches(stock, ours, torch.bfloat16)


def test_two_threads_and_small_chunks_match_and_restore_thread_count() -> None:
    before = torch.get_num_threads()
    stock, ours, _ = pair("qwen2_moe", ExpertPlacement.from_mode("cpu", cpu_threads=2, chunk_size=3))
    assert_matches(stock, ours, torch.float32, tokens=11)  # 22 tokens per pass, 8 chunks
    assert torch.get_num_threads() == before


def test_device_executor_runs_a_pass_in_chunk_size_spans_with_the_unchunked_numbers() -> None:
    # the GPU targets (gpu, stream) cut a pass into `chunk_size`-token spans like the CPU does, so a 16k-token
    # training pass's transient buffers exist for 8k tokens at a time; output and every gradient equal the one-span
    # pass (on CUDA where there is one, else the same executor code on the CPU device)
    from dataclasses import replace

    from kllama.experts.stream import DeviceExecutor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_tiny_model("deepseek_v2", seed=0, dtype=torch.float32)
    engine = install_expert_engine(model, lambda name: ExpertPlacement.from_mode("gpu", chunk_size=5), device)
    layer = next(iter(engine.modules.values()))
    executor = DeviceExecutor(stream=False)
    assert executor.chunks(layer, 22) == [slice(0, 5), slice(5, 10), slice(10, 15), slice(15, 20), slice(20, 22)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(22, layer.hidden_dim, generator=gen).to(device)
    index = torch.rand(22, layer.num_experts, generator=gen).topk(2, dim=-1).indices.to(device)
    weights = torch.rand(22, 2, generator=gen).to(device)
    grad_out = torch.randn(22, layer.hidden_dim, generator=gen).to(device)
    results = []
    for chunk_size in (5, 8192):
        layer.placement = replace(layer.placement, chunk_size=chunk_size)
        out, saved = executor.forward(layer, x, index, weights, (), (), keep=True)
        assert len(saved.chunks) == (5 if chunk_size == 5 else 1)
        grads = executor.backward(layer, saved, grad_out, (), (), [True, True])
        results.append((out, *grads))
    for chunked, whole in zip(*results):
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_matches_stock(reentrant: bool) -> None:
    # the saved pre-activations go through save_for_backward: checkpointing drops them in the first forward and its
    # recompute supplies them (non-reentrant), or the first forward runs without grad and saves nothing (reentrant)
    stock, ours, _ = pair("deepseek_v2", ExpertPlacement.from_mode("cpu", chunk_size=5))
    for model in (stock, ours):
        # transformers 5.2x renamed it (the old name warns); >= 5.17 is supported, so take what exists
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": reentrant})
        model.train()
    assert_matches(stock, ours, torch.float32)


def test_backward_uses_saved_activations_instead_of_recomputing() -> None:
    # forward = two expert GEMMs (gate_up, down); backward of frozen experts = two (into act, into x). A backward that
    # re-ran the forward would count twice the forward's FLOPs.
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens, top_k = 4, 32, 24, 40, 2
    layer = HostExperts(torch.randn(experts, 2 * inter, hidden, generator=gen), torch.randn(experts, hidden, inter,
                        generator=gen), torch.nn.SiLU(), ExpertPlacement.from_mode("cpu"), "experts",
                        compute_device=torch.device("cpu"))
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    index = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=gen, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        out = layer(x, index, weights)
    with FlopCounterMode(display=False) as backward:
        out.square().sum().backward()
    assert forward.get_total_flops() > 0
    assert backward.get_total_flops() <= 1.05 * forward.get_total_flops()
    assert x.grad is not None and weights.grad is not None


def test_stream_and_gpu_targets_fall_back_to_cpu_without_cuda() -> None:
    stock, ours, engine = pair("olmoe", ExpertPlacement.from_mode("auto", crossover_tokens=4))
    with pytest.warns(UserWarning, match="needs a CUDA compute device"):
        assert_matches(stock, ours, torch.float32)
    with engine.force_target("gpu"):
        assert all(m.target_for(1000) == "cpu" for m in engine.modules.values())
    assert all(m.forced_target is None for m in engine.modules.values())


def test_force_target_rejects_unknown_target() -> None:
    _, _, engine = pair("mixtral", ExpertPlacement.from_mode("cpu"))
    with pytest.raises(KllamaError, match="unknown expert target"):
        with engine.force_target("tpu"):  # type: ignore[arg-type]
            pass


def test_engine_reports_host_bytes_and_drops_stock_weights() -> None:
    stock = build_tiny_model("mixtral", seed=0)
    expected = sum(m.gate_up_proj.numel() + m.down_proj.numel() for m in find_expert_modules(stock).values()) * 4
    engine = install_expert_engine(stock, {n: ExpertPlacement() for n in find_expert_modules(stock)}, "cpu")
    assert engine.host_bytes() == expected
    assert engine.gpu_bytes() == 0
    assert "experts._gate_up" not in stock.state_dict()


def test_placement_mapping_must_cover_every_layer() -> None:
    model = build_tiny_model("qwen3_moe", seed=0)
    with pytest.raises(KllamaError, match="no expert placement for model.layers.1.mlp.experts, model.layers.2"):
        install_expert_engine(model, {"model.layers.0.mlp.experts": ExpertPlacement()}, "cpu")


def test_unsupported_family_names_supported_ones() -> None:
    model = build_tiny_model("llama", seed=0)
    with pytest.raises(KllamaError, match="deepseek_v2.*mixtral"):
        find_expert_modules(model)


def test_generation_with_cache_matches_stock() -> None:
    stock, ours, _ = pair("deepseek_v2", ExpertPlacement.from_mode("cpu"))
    ids = torch.tensor([[5, 9, 3, 7]])
    with torch.no_grad():
        ref = stock.generate(ids, max_new_tokens=6, do_sample=False)
        got = ours.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, got)
