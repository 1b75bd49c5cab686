"""CUDA-graph decode on the GPU: greedy tokens identical with and without graphs for every placement, graphs cut at
CPU expert passes only, clean fallback when a capture fails (and a process left clean by it).

Run on the GPU box: `pytest -q -m gpu tests/infer/test_graphs_gpu.py`.
"""
from __future__ import annotations

import pytest
import torch

from kllama.experts import ExpertLoraSet, ExpertPlacement, install_expert_engine
from kllama.experts.families import family_of, layer_index
from kllama.infer.batching import cache_argument, transformers_model
from kllama.infer.graphs import GraphedDecoder
from kllama.infer.sampling import SamplingParams, build_logits_processor, select_next_tokens
from kllama.model.tiny import build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
STEPS = 12


def cuda_model(arch: str, placement: str | None, dtype: torch.dtype = torch.bfloat16):  # noqa: ANN201
    """Tiny `arch` on the GPU with its experts on the engine: every layer on `placement`, or (None) odd MoE layers
    resident and even ones on the CPU."""
    model = build_tiny_model(arch, seed=0, dtype=dtype).cuda()
    spec = family_of(model)

    def choose(name: str) -> ExpertPlacement:
        mode = placement or ("gpu" if layer_index(name, spec) % 2 else "cpu")
        return ExpertPlacement.from_mode(mode)

    engine = install_expert_engine(model, choose, "cuda")
    return model, engine


def prompt_of(model: torch.nn.Module, length: int = 9, seed: int = 0) -> list[int]:
    return torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode(decoder: GraphedDecoder, prompt: list[int], steps: int = STEPS) -> tuple[list[int], list[torch.Tensor]]:
    logits = decoder.prefill(prompt)
    tokens, seen = [], []
    for i in range(steps):
        seen.append(logits.float().cpu())
        tokens.append(int(logits.argmax()))
        logits = decoder.step([tokens[-1]], [len(prompt) + i])[0]
    return tokens, seen


def plain_greedy(model: torch.nn.Module, prompt: list[int], steps: int = STEPS) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own loop (dynamic cache, its own masks), no graphs: the reference."""
    key = cache_argument(transformers_model(model))
    tokens, seen = [], []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt], device="cuda"), use_cache=True)
        for _ in range(steps):
            logits = out.logits[0, -1]
            seen.append(logits.float().cpu())
            tokens.append(int(logits.argmax()))
            cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
            out = model(input_ids=torch.tensor([[tokens[-1]]], device="cuda"), use_cache=True, **{key: cache})
    return tokens, seen


def assert_same_greedy(got: tuple[list[int], list[torch.Tensor]], ref: tuple[list[int], list[torch.Tensor]]) -> None:
    """Tokens identical, except that two different computations (other kernels, CPU vs GPU experts) may split a
    near-tie: the first differing token is accepted only where the reference's top-2 margin is within twice the
    logits' difference at that step (after it the sequences diverge and are not compared)."""
    for i, (a, b) in enumerate(zip(got[0], ref[0])):
        diff = float((got[1][i] - ref[1][i]).abs().max())
        assert diff <= 0.05 * float(ref[1][i].abs().max()) + 1e-3, f"step {i}: logits differ by {diff}"
        if a != b:
            top = ref[1][i].topk(2).values
            margin = float(top[0] - top[1])
            assert margin <= 2 * diff, f"step {i}: token {a} != {b} with a clear margin {margin} (diff {diff})"
            return


def add_expert_lora(model: torch.nn.Module, r: int, frozen: bool = False) -> None:
    """Expert LoRA of rank `r` (alpha 2r) with random B factors (a zero B would hide a wrong LoRA path), frozen like
    a loaded adapter when `frozen`."""
    ExpertLoraSet(model).add(r=r, alpha=2 * r, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    if frozen:
        model.requires_grad_(False)


def even_layers(model: torch.nn.Module, engine) -> list[str]:  # noqa: ANN001
    """The MoE layers a mixed placement keeps on the CPU."""
    return [name for name in engine.modules if layer_index(name, family_of(model)) % 2 == 0]


def captured_step(decoder: GraphedDecoder, bucket: int = 1):  # noqa: ANN201
    """The (only) step captured for batch bucket `bucket`."""
    (captured,) = [c for (b, _), c in decoder._captured.items() if b == bucket]
    return captured


def kinds(decoder: GraphedDecoder, bucket: int = 1) -> list[str]:
    """The pieces of the (only) step captured for batch bucket `bucket`."""
    return [item.kind for item in captured_step(decoder, bucket).items]


# how a graph hands its CPU passes over: "flag" and "host-node" (`HostNodePass`), or "off": eager passes between graphs
HANDOFF_MODES = ["flag", "host-node", "off"]


def decoder_for(model: torch.nn.Module, max_batch: int, max_len: int, mode: str, **options: bool) -> GraphedDecoder:
    if mode == "off":
        return GraphedDecoder(model, max_batch, max_len, host_nodes=False, **options)
    decoder = GraphedDecoder(model, max_batch, max_len, handoff=mode, **options)
    assert decoder.handoff == mode  # stream memory operations work on every supported GPU
    return decoder


@pytest.mark.parametrize("mode", HANDOFF_MODES)
@pytest.mark.parametrize("placement", ["gpu", "cpu", "auto", None])
@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_graphed_greedy_equals_eager(arch: str, placement: str | None, mode: str) -> None:
    model, engine = cuda_model(arch, placement)
    prompt = prompt_of(model)
    graphed = decoder_for(model, 1, 48, mode)
    host_nodes = mode != "off"
    eager = GraphedDecoder(model, 1, 48, use_graphs=False)
    got = decode(graphed, prompt)
    assert graphed.graphed, graphed.reason
    expected = decode(eager, prompt)
    assert got[0] == expected[0]  # same kernels, replayed: identical tokens
    assert all(torch.allclose(a, b, atol=1e-2, rtol=1e-2) for a, b in zip(got[1], expected[1]))
    assert_same_greedy(got, plain_greedy(model, prompt))  # and what transformers' own loop decodes
    n, even = len(engine.modules), len(even_layers(model, engine))
    cpu_layers = {"gpu": 0, "cpu": n, "auto": n, None: even}[placement]  # mixed: odd MoE layers resident
    jobs = captured_step(graphed).jobs
    if host_nodes:  # every CPU pass is a host node of the step's one graph (the kernel takes every tiny layer)
        assert kinds(graphed) == ["graph"] and len(jobs) == cpu_layers
        assert all(job.runs == STEPS and job.error == "" for job in jobs)  # one run a replay
    else:  # the graphs are cut at each CPU pass, run eagerly between them
        assert kinds(graphed).count("host") == cpu_layers and not jobs  # a decode token never streams under auto
        assert kinds(graphed).count("graph") == cpu_layers + 1


@pytest.mark.parametrize("mode", HANDOFF_MODES)
def test_shared_experts_computed_during_the_cpu_passes_change_no_logit(mode: str) -> None:
    model, engine = cuda_model("deepseek_v2", "cpu")
    prompt = prompt_of(model)
    overlaps = [m.shared_overlap for m in engine.modules.values()]
    got = decode(decoder_for(model, 1, 48, mode), prompt)
    # eager passes (the prompt, the warm-up before a capture, "off"'s passes between graphs) and a flag hand-off's
    # capture compute them inside the routed pass; a host node's pass does not (it blocks the stream)
    assert all(o.launches > 0 for o in overlaps)
    for module in engine.modules.values():
        module.shared_overlap = None
    before = [o.launches for o in overlaps]
    expected = decode(decoder_for(model, 1, 48, mode), prompt)
    assert [o.launches for o in overlaps] == before
    assert got[0] == expected[0] and all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_placements_decode_the_same_tokens(arch: str) -> None:
    runs = {}
    for placement in ("gpu", "cpu", "auto"):
        model, _ = cuda_model(arch, placement)
        runs[placement] = decode(GraphedDecoder(model, 1, 48), prompt_of(model))
    assert_same_greedy(runs["cpu"], runs["gpu"])
    assert_same_greedy(runs["auto"], runs["gpu"])


@pytest.mark.parametrize("mode", HANDOFF_MODES)
def test_batched_slots_graphed_equal_eager(mode: str) -> None:
    host_nodes = mode != "off"
    model, engine = cuda_model("deepseek_v2", None)
    prompts = [prompt_of(model, n, seed=n) for n in (5, 11, 8)]
    cpu_module = engine.modules[even_layers(model, engine)[0]]
    rows_seen: list[int] = []
    run_pass = cpu_module.run_pass

    def counting(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows_seen.append(x.shape[0])
        return run_pass(x, index, weights)

    cpu_module.run_pass = counting  # the CPU layer's pass, as a replay calls it
    results = []
    for use_graphs in (True, False):
        decoder = decoder_for(model, 4, 32, mode, use_graphs=use_graphs) if use_graphs else GraphedDecoder(
            model, 4, 32, use_graphs=False)
        last = [int(decoder.prefill(p, slot=s).argmax()) for s, p in enumerate(prompts)]
        tokens = [last]
        rows_seen.clear()
        for i in range(6):
            last = decoder.step(last, [len(p) + i for p in prompts]).argmax(-1).tolist()  # bucket 4, one padding row
            tokens.append(last)
        results.append(tokens)
        assert decoder.graphed == use_graphs
        if use_graphs and host_nodes:  # the host nodes compute the 3 real rows, never the padding row
            jobs = captured_step(decoder, 4).jobs
            assert len(jobs) == len(even_layers(model, engine)) and {job.rows for job in jobs} == {3}
            assert {job.runs for job in jobs} == {6} and rows_seen == [4, 4]  # only the warm-up ran it eagerly
        else:
            assert rows_seen[-5:] == [3] * 5  # replays hand the CPU pass the 3 real rows, never the padding row
    assert results[0] == results[1]
    logits = decoder.step([results[0][-1][0], 0, 7], [len(prompts[0]) + 6, -1, len(prompts[2]) + 6])  # slot 1 idles
    assert torch.isfinite(logits[[0, 2]]).all()


def test_resident_experts_with_lora_are_one_graph() -> None:
    model, _ = cuda_model("qwen3_moe", "gpu")
    add_expert_lora(model, r=8)  # r=8: the grouped GEMM (capturable) path
    prompt = prompt_of(model)
    graphed = GraphedDecoder(model, 1, 48)
    got = decode(graphed, prompt)
    assert kinds(graphed) == ["graph"]
    assert got[0] == decode(GraphedDecoder(model, 1, 48, use_graphs=False), prompt)[0]


@pytest.mark.parametrize("mode", HANDOFF_MODES)
def test_split_experts_times_each_part(mode: str) -> None:
    host_nodes = mode != "off"
    model, engine = cuda_model("deepseek_v2", None)
    decoder = decoder_for(model, 1, 48, mode, split_experts=True)
    logits = decoder.prefill(prompt_of(model))
    _, times = decoder.timed_step([int(logits.argmax())], [9])
    n, even = len(engine.modules), len(even_layers(model, engine))
    graphs, hosts = (n, 0) if host_nodes else (n - even, even)  # host nodes get expert graphs of their own
    assert kinds(decoder).count("expert-graph") == graphs and kinds(decoder).count("host") == hosts
    assert times is not None and times.expert_ms > 0 and times.other_gpu_ms > 0
    assert times.wall_ms >= times.other_gpu_ms and times.host_ms >= 0


def sync_on_read(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
    """A forward hook that reads the device (what an unsupported op would do): fine eagerly, forbidden while
    capturing, so a capture of the step fails."""
    float(output.sum())


def test_failed_capture_falls_back_to_eager_steps() -> None:
    """A failed capture gives eager steps with the same tokens, and strands neither the default CUDA RNG nor the
    allocator in capture mode: random draws, sampling at temperature 1, emptying the cache and a later capture all
    work, and the default RNG stream did not move."""
    model, _ = cuda_model("qwen3_moe", "gpu")
    prompt = prompt_of(model)
    expected = decode(GraphedDecoder(model, 1, 48, use_graphs=False), prompt)
    handle = model.model.norm.register_forward_hook(sync_on_read)
    try:
        torch.cuda.manual_seed(7)
        decoder = GraphedDecoder(model, 1, 48)
        got = decode(decoder, prompt)
    finally:
        handle.remove()
    assert not decoder.graphed and decoder.reason.startswith("capture failed"), decoder.reason
    assert got[0] == expected[0]

    drawn = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(7)
    assert torch.equal(drawn, torch.rand(4, device="cuda"))  # the capture drew nothing from the default generator
    torch.empty(8, device="cuda").uniform_()
    params = SamplingParams(temperature=1.0)
    logits = decoder.prefill(prompt)[None]  # [1, V]
    token = select_next_tokens(logits, torch.tensor([prompt], device="cuda"), params, build_logits_processor(params))
    assert 0 <= int(token) < model.config.vocab_size
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # fails an allocator assert while it believes a capture is still under way
    again = GraphedDecoder(model, 1, 48)
    assert decode(again, prompt)[0] == expected[0]
    assert again.graphed, again.reason


def test_a_frozen_expert_lora_is_one_graph_that_makes_its_factors_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # what `kllama chat` decodes: the loaded adapter is frozen, so the passes keep its per-expert factors, made by
    # the first eager pass before any capture; the captured step reads them and makes none (one graph, same tokens)
    from kllama.experts import routed

    model, engine = cuda_model("qwen3_moe", "gpu")
    add_expert_lora(model, r=8, frozen=True)
    made, inner = [], routed.expert_factors
    monkeypatch.setattr(routed, "expert_factors", lambda *a: made.append(1) or inner(*a))
    prompt = prompt_of(model)
    eager = decode(GraphedDecoder(model, 1, 48, use_graphs=False), prompt)[0]
    projections = sum(len(m.lora) for m in engine.modules.values())
    assert len(made) == projections
    graphed = GraphedDecoder(model, 1, 48)
    got = decode(graphed, prompt)[0]
    assert kinds(graphed) == ["graph"] and got == eager
    assert len(made) == projections  # nothing made during the warm-up, the capture or the replays


@pytest.mark.parametrize("expert_dtype", ["int8", "fp8"])
def test_quantized_cpu_experts_with_a_frozen_lora_decode_as_host_nodes_of_one_graph(expert_dtype: str) -> None:
    # `kllama chat --expert_dtype int8` with an adapter on CPU experts: each layer's kernel pass (its LoRA's kept
    # host factors included) is a host node; the tokens are those of eager steps over the same kernel
    model = build_tiny_model("deepseek_v2", seed=0, dtype=torch.bfloat16).cuda()
    engine = install_expert_engine(model, lambda name: ExpertPlacement.from_mode("cpu"), "cuda",
                                   expert_dtype=expert_dtype)
    add_expert_lora(model, r=4, frozen=True)
    prompt = prompt_of(model)
    expected = decode(GraphedDecoder(model, 1, 48, use_graphs=False), prompt)
    graphed = GraphedDecoder(model, 1, 48)
    got = decode(graphed, prompt)
    assert kinds(graphed) == ["graph"] and len(captured_step(graphed).jobs) == len(engine.modules)
    assert got[0] == expected[0]
    assert all(torch.allclose(a, b, atol=1e-2, rtol=1e-2) for a, b in zip(got[1], expected[1]))


@pytest.mark.parametrize("mode", ["flag", "host-node"])
def test_a_decoder_dropped_with_a_step_in_flight_waits_for_its_host_nodes(mode: str) -> None:
    # a caller that never reads its last step's logits: the replay's host passes still run the decoder's kernel
    # jobs over its pinned buffers after the decoder is gone, unless its end waits for them (it crashed once)
    model, _ = cuda_model("deepseek_v2", "cpu")
    prompt = prompt_of(model)
    for _ in range(3):
        decoder = decoder_for(model, 1, 48, mode)
        decoder.prefill(prompt)
        for i in range(4):
            decoder.step([i + 1], [len(prompt) + i])
        assert len(decoder.host_jobs()) == len(model.model.layers) - model.config.first_k_dense_replace
        del decoder
    torch.cuda.synchronize()


@pytest.mark.parametrize("spare_core", [True, False])
def test_host_nodes_take_every_core_when_the_replaying_thread_sleeps(spare_core: bool) -> None:
    # spare_core=False: the kernel jobs get all of the placement's threads and `step` returns only once the step is
    # done (it slept on a blocking event); the tokens are those of the eager decoder either way
    model, engine = cuda_model("deepseek_v2", "cpu")
    threads = next(iter(engine.modules.values())).placement.cpu_threads or torch.get_num_threads()
    prompt = prompt_of(model)
    graphed = GraphedDecoder(model, 1, 48, spare_core=spare_core)
    got = decode(graphed, prompt)
    assert graphed.graphed, graphed.reason
    assert got[0] == decode(GraphedDecoder(model, 1, 48, use_graphs=False), prompt)[0]
    jobs = graphed.host_jobs()
    assert jobs and all(job.threads == (max(1, threads - 1) if spare_core else threads) for job in jobs)
    graphed.step([1], [len(prompt) + STEPS])
    if not spare_core:
        assert captured_step(graphed).replayed.query()  # nothing left in flight when step() returned
