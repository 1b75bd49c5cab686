"""Streamed no-grad passes with a CPU share (experts [0, k) on the CPU, [k, E) streamed) on CUDA: the same numbers
as streaming everything, the same prefetch order, and training passes never split.

Run on the GPU box: `.venv/bin/pytest -q -m gpu tests/experts/`.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kllama.experts import ExpertPlacement, HostExperts, install_expert_engine
from kllama.experts.lora import ExpertLoRA
from kllama.experts.split_trace import passes, traced_split
from kllama.model.tiny import build_tiny_model

from expert_helpers import rel, streamed_stack

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def add_lora(layers: list[HostExperts]) -> None:
    for layer in layers:
        lora = ExpertLoRA(8, 128, 256, 8, 16, device=torch.device("cuda"), dtype=torch.bfloat16)
        lora.reset_parameters()
        with torch.no_grad():
            lora.lora_B.normal_(std=0.3)
        layer.lora["gate_up_proj"] = lora


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
@pytest.mark.parametrize("with_lora", [False, True])
def test_forced_split_equals_streaming_everything_with_the_same_prefetch_order(scheme: str | None,
                                                                                with_lora: bool) -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    layers, streamer = streamed_stack(device, scheme=scheme)
    if with_lora:
        add_lora(layers)
    x = torch.randn(96, 128, device=device, dtype=torch.bfloat16)
    index = torch.rand(96, 8, device=device).topk(2, dim=-1).indices
    weights = torch.rand(96, 2, device=device)

    def forward(split: int | None) -> tuple[torch.Tensor, list[int], list[int]]:
        streamer.invalidate()
        streamer.copies.clear()
        for layer in layers:
            layer.forced_split = split
        h = x
        held = []
        with torch.no_grad():
            for layer in layers:
                h = h + layer(h, index, weights)
                held.append(min(s.first for s in streamer._slots if s.layer == layer_index(layer)))
        torch.cuda.synchronize()
        return h, [c.layer for c in streamer.copies], held

    def layer_index(layer: HostExperts) -> int:
        return layers.index(layer)

    whole, order, held = forward(None)
    assert order == [0, 1, 2, 3, 0] and held == [0, 0, 0, 0]
    for split in (3, 8):
        got, split_order, split_held = forward(split)
        assert split_order == order, split  # the copies of the same layers in the same order, fewer experts each
        assert split_held == [split] * 4
        assert rel(got, whole) < 2e-2, split
    ones, _, _ = forward(0)
    assert torch.equal(ones, whole)  # k = 0 is the plain stream pass


def test_split_passes_stage_through_the_same_pinned_buffers() -> None:
    # no pinned tensor per layer: every layer's inputs, rows and tokens go through one set of buffers, pass after
    # pass, and the numbers are those of a pass that had fresh ones
    from kllama.experts.module import _SPLIT

    torch.manual_seed(0)
    device = torch.device("cuda")
    layers, streamer = streamed_stack(device)
    x = torch.randn(96, 128, device=device, dtype=torch.bfloat16)
    index = torch.rand(96, 8, device=device).topk(2, dim=-1).indices
    weights = torch.rand(96, 2, device=device)
    for layer in layers:
        layer.forced_split = 3

    def forward() -> tuple[torch.Tensor, dict[str, int]]:
        streamer.invalidate()
        h = x
        with torch.no_grad():
            for layer in layers:
                h = h + layer(h, index, weights)
        torch.cuda.synchronize()
        return h, {name: buf.data_ptr() for name, buf in _SPLIT.staging()._buffers.items()}

    _SPLIT._local.__dict__.pop("staging", None)  # fresh buffers for the first pass, reused by the second
    first, pointers = forward()
    with traced_split() as timings:
        again, same = forward()
    assert [t.experts for t in timings] == [3] * 4 and passes(timings) == [timings]
    assert all(t.staged <= t.cpu_start <= t.cpu_end <= t.resumed for t in timings)
    assert all(t.rows == int((index < 3).sum()) for t in timings)
    assert set(pointers) >= {"in0", "in1", "in2", "rows", "tokens"} and same == pointers
    assert all(buf.is_pinned() for buf in _SPLIT.staging()._buffers.values())
    assert rel(again, first) < 1e-3  # index_add_'s fp32 atomics may add a token's CPU rows in another order
    assert streamer.held_from(layers[0], 3) == 3 and streamer.held_from(layers[3], 5) == 3  # what the slots hold


def test_lockstep_reference_uses_the_whole_layer_the_policy_copied() -> None:
    # a no-grad pass that would split finds the layer whole in its slot (the training pass before it copied all of
    # it): it computes everything there, copying nothing more, and gives the policy's numbers
    torch.manual_seed(0)
    device = torch.device("cuda")
    layers, streamer = streamed_stack(device)
    for layer in layers:
        layer.forced_split = 3
    x = torch.randn(64, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, 8, (64, 2), device=device)
    weights = torch.rand(64, 2, device=device)
    h, reference = x, x.detach()
    for layer in layers:
        h = h + layer(h, index, weights)
        with torch.no_grad():
            reference = reference + layer(reference, index, weights)
    h.float().square().mean().backward()
    torch.cuda.synchronize()
    assert [c.layer for c in streamer.copies] == [0, 1, 2, 3, 1, 0]
    assert all(s.first == 0 for s in streamer._slots)  # training passes copy whole layers
    assert torch.equal(reference, h.detach())


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_model_prefill_with_a_cpu_share_matches_streaming(arch: str) -> None:
    model = build_tiny_model(arch, seed=0, dtype=torch.bfloat16).cuda()
    ours = copy.deepcopy(model)
    engine = install_expert_engine(ours, lambda name: ExpertPlacement.from_mode("stream"), "cuda", measure=False)
    embeds = torch.randn(1, 48, model.config.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.5
    results = []
    for split in (None, 2):
        for module in engine.modules.values():
            module.forced_split = split
        with torch.no_grad():
            results.append(ours(inputs_embeds=embeds).logits)
    assert rel(results[1], results[0]) < 2e-2


@pytest.mark.parametrize("mode", ["auto", "stream"])
def test_streaming_engine_measures_its_split_model(mode: str) -> None:
    model = build_tiny_model("deepseek_v2", seed=0, dtype=torch.bfloat16).cuda()
    engine = install_expert_engine(model, lambda name: ExpertPlacement.from_mode(mode), "cuda")
    assert all(m.cpu_share is not None and m.cpu_share.expert_samples for m in engine.modules.values())
    note = engine.split_note(2048)
    assert note is not None and note.startswith("long no-grad passes: ")
    module = next(iter(engine.modules.values()))
    assert module.split_for(2048, training=True) == 0
    streams = module.target_for(2048) == "stream"  # a tiny layer may run on the CPU at any size
    assert module.split_for(2048) == (module.cpu_share.plan(2048).cpu_experts if streams else 0)
    assert bool(engine.measurements) == (mode == "auto")  # crossovers only where a placement has two targets
