"""Crossovers per pass kind: the physics bounds, the arithmetic on measured timings, which target each pass kind gets,
and (GPU) that a decode step under `auto` runs its experts on the CPU."""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

from kllama.experts import ExpertPlacement, HostExperts
from kllama.experts.crossover import (
    COPIES_PER_PASS, MIN_CROSSOVER, NEVER, Crossovers, cpu_pass_seconds, crossover_from_samples, interpolate,
    measure_crossover, measure_crossovers, running_max, sample_cpu_until,
)
from kllama.experts.cpu_kernels import kernel_status
from kllama.experts.report import placement_table

# What a V2-Lite layer's CPU inference pass cost on the H200 box's host (benchmarks/NOTES.md order of magnitude):
# memory-bound while few experts are touched, then growing with the tokens; one layer copy takes 20.4 ms.
MEASURED = [(1, 0.0024), (2, 0.0045), (4, 0.0085), (8, 0.0150), (16, 0.0240), (32, 0.0330)]
COPY_S = 0.0204


def test_crossover_interpolates_between_the_samples_around_the_copy_time() -> None:
    # 8 tokens: 15.0 ms, 16 tokens: 24.0 ms -> 20.4 ms at 8 + 5.4 / 9.0 * 8 = 12.8 -> 13
    assert crossover_from_samples(MEASURED, COPY_S) == 13
    # a training pass copies the layer twice (forward, then backward): 40.8 ms, extrapolated past 32 tokens
    # (33.0 ms at 32 tokens, 0.5625 ms per token beyond: 32 + 7.8 / 0.5625 = 45.9 -> 46)
    assert crossover_from_samples(MEASURED, COPIES_PER_PASS["training"] * COPY_S) == 46


def test_one_token_never_streams() -> None:
    # even where the CPU looks slower than a copy at 1 token (a noisy or odd machine) a 1-token pass stays on the CPU
    assert crossover_from_samples([(1, 0.05), (2, 0.06)], 0.02) == MIN_CROSSOVER == 2
    assert crossover_from_samples([(1, 0.0199), (2, 0.0201)], 0.02) == 2


def test_noisy_timings_are_made_monotone() -> None:
    # a pass over more tokens never costs less: the 2-token dip is noise and must not move the crossover down
    assert running_max([(4, 0.03), (1, 0.01), (2, 0.004)]) == [(1, 0.01), (2, 0.01), (4, 0.03)]
    assert crossover_from_samples([(1, 0.01), (2, 0.004), (4, 0.03)], 0.02) == 3


def test_cpu_that_never_reaches_the_copy_is_extrapolated_or_never() -> None:
    assert crossover_from_samples([(1, 0.001), (2, 0.002)], 0.02) == 20  # 1 ms/token
    assert crossover_from_samples([(1, 0.001), (2, 0.001)], 0.02) == NEVER  # no growth: the CPU always wins
    assert crossover_from_samples([], 0.02) == NEVER


def test_estimates_from_a_measurement() -> None:
    found = Crossovers(13, 41, COPY_S, {"inference": MEASURED})
    assert found.stream_seconds("training") == pytest.approx(2 * found.stream_seconds("inference"))
    assert found.cpu_seconds("inference", 12) == pytest.approx(interpolate(MEASURED, 12)) == pytest.approx(0.0195)
    assert found.cpu_seconds("inference", 64) == pytest.approx(0.033 + 32 * 0.009 / 16)


def test_sampling_doubles_until_the_cpu_costs_more_than_the_stream_floor() -> None:
    seen = []

    def pass_seconds(tokens: int) -> float:  # injected timings: 1.5 ms per token
        seen.append(tokens)
        return 0.0015 * tokens

    samples = sample_cpu_until(pass_seconds, COPY_S)
    assert seen == [1, 2, 4, 8, 16] and samples[-1] == (16, 0.024)
    assert crossover_from_samples(samples, COPY_S) == 14  # 20.4 / 1.5
    assert sample_cpu_until(lambda t: 1e-6 * t, COPY_S, max_tokens=64)[-1][0] == 64  # stops at max_tokens


def test_a_slow_first_sample_does_not_spend_the_sampling_budget() -> None:
    # the first CPU pass of a fresh machine builds the C++ kernel (14 s on the H200 box): the budget counts from
    # after it, and a crossover comes out however long it took
    seen = []

    def pass_seconds(tokens: int) -> float:  # injected timings: a one-time cost on the first call, then 1.5 ms/token
        seen.append(tokens)
        if len(seen) == 1:
            time.sleep(0.3)
        return 0.0015 * tokens

    samples = sample_cpu_until(pass_seconds, COPY_S, budget_s=0.2)
    assert seen == [1, 2, 4, 8, 16]
    assert crossover_from_samples(samples, COPY_S) == 14
    # a budget spent by slow passes still leaves two samples to extrapolate from, never NEVER
    slow = sample_cpu_until(lambda t: time.sleep(0.05) or 0.0015 * t, COPY_S, budget_s=0.0)
    assert len(slow) == 2 and MIN_CROSSOVER <= crossover_from_samples(slow, COPY_S) < NEVER


def test_placement_keeps_one_crossover_per_pass_kind() -> None:
    p = ExpertPlacement.from_mode("auto").with_crossovers(inference=30, training=8)
    assert [p.target_for(t) for t in (1, 8, 29, 30)] == ["cpu", "cpu", "cpu", "stream"]
    assert [p.target_for(t, training=True) for t in (1, 7, 8)] == ["cpu", "cpu", "stream"]
    given = ExpertPlacement.from_mode("auto", crossover_tokens=700)  # a rule's crossover applies to both kinds
    assert given.target_for(699) == given.target_for(699, training=True) == "cpu"
    assert ExpertPlacement.from_mode("cpu").target_for(10**6, training=True) == "cpu"


def _layer(placement: ExpertPlacement) -> HostExperts:
    gen = torch.Generator().manual_seed(0)
    return HostExperts(torch.randn(4, 16, 8, generator=gen), torch.randn(4, 8, 8, generator=gen), torch.nn.SiLU(),
                       placement, "model.layers.1.mlp.experts", compute_device="cpu")


@pytest.mark.parametrize("training", [False, True])
def test_the_pass_kind_picks_the_crossover(training: bool) -> None:
    # 5 tokens: a training pass is past its crossover (2) and streams; a no-grad pass is under its own (100): CPU.
    # Without CUDA a streamed pass runs on the CPU with a warning naming the target it was given.
    layer = _layer(ExpertPlacement.from_mode("auto").with_crossovers(inference=100, training=2))
    x = torch.randn(5, 8, requires_grad=training)
    index, weights = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]]), torch.rand(5, 2)
    with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(training):
        warnings.simplefilter("always")
        layer(x, index, weights)
    streamed = any("'stream' needs a CUDA compute device" in str(w.message) for w in caught)
    assert streamed == training


def test_placement_table_shows_both_crossovers() -> None:
    layer = _layer(ExpertPlacement.from_mode("auto").with_crossovers(inference=30, training=8))
    table = placement_table({layer.name: layer})
    assert "infer 30 tok / train 8 tok" in table
    layer.placement = layer.placement.with_crossover(700)
    assert "700 tok" in placement_table({layer.name: layer})


def test_cpu_pass_probe_times_both_kinds() -> None:
    # timings on a shared 2-core box are too noisy to compare sizes; check the probe runs the engine's passes
    gate_up = torch.full((8, 256, 128), 0.01, dtype=torch.bfloat16)
    down = torch.full((8, 128, 128), 0.01, dtype=torch.bfloat16)
    for kind in ("inference", "training"):
        seconds = cpu_pass_seconds(16, gate_up, down, 2, kind, repeats=1)
        assert 0 < seconds < 60


def test_without_cuda_streaming_never_wins() -> None:
    start = time.perf_counter()
    assert measure_crossover(64, 32, 8, 2, torch.float32, "cpu") == NEVER
    assert measure_crossovers(64, 32, 8, 2, torch.float32, "cpu") == Crossovers(NEVER, NEVER)
    assert time.perf_counter() - start < 0.5


def cpu_contention() -> float:
    """Runnable threads per usable core over the last minute, at least 1: how many times slower than on an idle host
    CPU-bound work runs now (a suite run beside a benchmark, or with more threads than cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1.0, os.getloadavg()[0] / cores) if hasattr(os, "getloadavg") else 1.0


@pytest.mark.parametrize("kind", ["inference", "training"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measured_crossovers_on_gpu_hold_and_are_cheap(kind: str) -> None:
    # full V2-Lite layer shape: two measurements agree within a factor 2 (the first call used to say 14, the second
    # 41), both >= 2, and both kinds together take well under 2 s on an idle host. The time bound scales with the
    # host's load: the measurement's CPU passes use every core, so a busy host slows them by its oversubscription
    # (13.6 s was seen with the suite beside 16 other threads), which says nothing about the measurement's cost.
    contention = cpu_contention()
    # every usable core, as `kllama train` measures (the suite's own torch pool is capped by tests/conftest.py)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    kernel_status()  # the kernel's one-time build (14 s on a fresh box) is no part of the measurement's cost
    start = time.perf_counter()
    first = measure_crossovers(2048, 1408, 64, 6, torch.bfloat16, "cuda", cpu_threads=threads)
    elapsed = time.perf_counter() - start
    second = measure_crossovers(2048, 1408, 64, 6, torch.bfloat16, "cuda", cpu_threads=threads)
    contention = max(contention, cpu_contention())
    a, b = getattr(first, kind), getattr(second, kind)
    print(f"{kind} crossover {a} / {b} tokens (copy {first.copy_s * 1e3:.1f} ms), both kinds in {elapsed:.2f} s "
          f"at CPU contention {contention:.1f}; samples {first.samples[kind]}")
    assert MIN_CROSSOVER <= a < NEVER and MIN_CROSSOVER <= b < NEVER
    assert max(a, b) <= 2 * min(a, b) + 2
    assert elapsed < 4.0 * contention


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_step_under_auto_runs_experts_on_the_cpu() -> None:
    # small but not tiny (hidden 1024, 32 experts of width 512, 4 MoE layers): the measured inference crossover is
    # real, and a 1-token pass must never stream
    from kllama.experts import install_expert_engine
    from kllama.experts.module import expert_pass_hook
    from kllama.infer.batching import cache_argument, transformers_model
    from kllama.model.tiny import build_tiny_model

    model = build_tiny_model("deepseek_v2", seed=0, dtype=torch.bfloat16, hidden_size=1024, num_hidden_layers=5,
                             n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
                             num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=128,
                             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64).cuda().eval()
    engine = install_expert_engine(model, lambda name: ExpertPlacement.from_mode("auto"), "cuda")
    p = next(iter(engine.modules.values())).placement
    print(placement_table(engine))
    assert p.crossover(training=False) >= MIN_CROSSOVER and p.crossover(training=True) >= MIN_CROSSOVER
    targets: dict[int, list[str]] = {}

    def count(module, x, index, weights):  # noqa: ANN001, ANN202
        targets.setdefault(x.shape[0], []).append(module.target_for(x.shape[0]))
        return module.run_pass(x, index, weights)

    prompt = torch.randint(0, model.config.vocab_size, (1, 8), device="cuda")
    with torch.inference_mode(), expert_pass_hook(count):
        out = model(input_ids=prompt, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
        model(input_ids=token, use_cache=True, **{cache_argument(transformers_model(model)): cache})
    assert targets[1] == ["cpu"] * len(engine.modules)
