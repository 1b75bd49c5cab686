"""Resident layers promoted from a measured step: the worst-pass bound, the estimate, and (GPU) the run itself."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from train_helpers import train_tiny_dpo

from kllama.train.micro_batching import chunk_rows, largest_pass_tokens, padded
from kllama.train.promotion import (
    GiB,
    StepMemory,
    activation_bytes,
    build_promotion,
    estimate_promotion,
    no_promotion_line,
    run_epochs,
    safety_margin,
)

GB = 10**9


def test_largest_pass_bound_is_what_some_order_of_the_rows_reaches_and_none_exceeds():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randrange(1, 400) for _ in range(rng.randrange(1, 7))]
        step_rows, budget = rng.randrange(1, 5), rng.choice([0, 300, 1000, 4000])
        bound = largest_pass_tokens(lengths, 2, step_rows, budget)
        seen = 0
        for step in itertools.permutations(range(len(lengths)), min(step_rows, len(lengths))):
            step_lengths = [lengths[i] for i in step]
            passes = chunk_rows(step_lengths, 2, budget) if budget else [list(range(len(step)))]
            seen = max(seen, *(len(p) * 2 * padded(max(step_lengths[i] for i in p)) for p in passes))
        assert seen == bound, (lengths, step_rows, budget)


def test_largest_pass_of_the_seed_yaml():
    # 8 pairs a step, 16,384-token passes: a pair truncated to 2,048 tokens leads a pass of 4 such pairs
    assert largest_pass_tokens([2048] * 5 + [700] * 295, 2, 8, 16384) == 16384
    # short pairs: the whole step of 8 is one pass, padded to the 8th-longest row
    assert largest_pass_tokens([300] * 10 + [100] * 50, 2, 8, 16384) == 8 * 2 * 304
    # the user's batching (no budget): per_device rows per pass
    assert largest_pass_tokens([100, 2048, 50], 2, 1, 0) == 2 * 2048


def _step(tokens: int, activations: float, end: float = 14.0, overhead: float = 0.5) -> StepMemory:
    start = 13.0 * GB
    peak = start + activations * GB
    return StepMemory(tokens=tokens, start=int(start), peak_allocated=int(peak),
                      peak_reserved=int(peak + overhead * GB), end=int(end * GB))


def test_activation_estimate_measured_fitted_or_scaled():
    # a step as large as the worst pass: its own measurement, nothing extrapolated
    assert activation_bytes([_step(16384, 6.0), _step(8000, 4.0)], 16384) == 6 * GB
    # two sizes spanning >= a quarter of the target: a line (2 GB + 0.5 GB per 2,048 tokens) through both
    fitted = activation_bytes([_step(6144, 3.5), _step(12288, 5.0)], 16384)
    assert fitted == pytest.approx(6.0 * GB, rel=1e-6)
    # one size (or sizes too close to fit a line): scaled in proportion, which counts the fixed 2 GB as per-token
    assert activation_bytes([_step(8192, 4.0)], 16384) == 8 * GB
    assert activation_bytes([_step(8192, 4.0), _step(9000, 4.2)], 16384) == pytest.approx(4.2 * 16384 / 9000 * GB)
    # a noisy point above the line: the line is raised to lie above every measured point
    raised = activation_bytes([_step(4096, 3.0), _step(8192, 3.5), _step(12288, 5.0)], 16384)
    assert raised >= 6.0 * GB and all(raised >= a * GB for a in (3.0, 3.5, 5.0))


def test_seed_yaml_estimate_promotes_what_fits_beside_the_worst_pass():
    # V2-Lite under 26 GB: 14 GB between steps (6 resident layers, stream slots, LoRA + Adam), a 16,384-token pass
    # measured at 6 GB of activations, the allocator 0.5 GB above that at its peak. Worst step 14 + 6 = 20 GB
    # allocated; kept free: fragmentation max(0.5, 10 % of 20) = 2 GB + the 1 GiB safety margin; 26 - 20 - 3.07
    # = 2.93 GB: two 1.107 GB layers.
    layer = int(1.107 * GB)
    estimate = estimate_promotion([_step(16384, 6.0)], worst_tokens=16384, budget=26 * GB, layer_bytes=layer,
                                  candidates=20)
    assert estimate.worst_bytes == 20 * GB and estimate.fragmentation == 2 * GB
    assert estimate.margin == 2 * GB + GiB
    assert estimate.layers == 2
    # never more than the streamed layers, never a negative count when the step already fills the budget
    assert estimate_promotion([_step(16384, 6.0)], worst_tokens=16384, budget=26 * GB, layer_bytes=layer,
                              candidates=1).layers == 1
    assert estimate_promotion([_step(16384, 12.0)], worst_tokens=16384, budget=26 * GB, layer_bytes=layer,
                              candidates=20).layers == 0
    # a half-size step scaled to the worst pass: activations 3 -> 6 GB, its measured fragmentation with them (2.5 ->
    # 5 GB, above the 10 % floor): 20 GB + 5 + 1.07 kept free, no room, where the same step at full size left two
    small = estimate_promotion([_step(8192, 3.0, overhead=2.5)], worst_tokens=16384, budget=26 * GB,
                               layer_bytes=layer, candidates=20)
    assert small.worst_bytes == 20 * GB and small.fragmentation == 5 * GB and small.layers == 0


def test_fragmentation_is_read_at_the_fullest_step():
    # the second, smaller step finds the first one's blocks still cached (reserved - allocated = 3.5 GB): that is
    # not fragmentation, the 2.5 GB at the larger step's peak is
    layer = int(1.107 * GB)
    steps = [_step(16384, 6.0, overhead=2.5), _step(6144, 3.0, overhead=3.5)]
    estimate = estimate_promotion(steps, worst_tokens=16384, budget=24 * GB, layer_bytes=layer, candidates=20)
    assert estimate.fragmentation == int(2.5 * GB)
    # the allocator's own count of free bytes inside partly used blocks counts when it is the larger
    split = StepMemory(tokens=16384, start=13 * GB, peak_allocated=19 * GB, peak_reserved=19 * GB + GiB,
                       end=14 * GB, peak_inactive_split=int(2.5 * GB))
    assert split.fragmentation == int(2.5 * GB)


def test_the_seed_yaml_oom_case_would_not_have_promoted_three_layers():
    # Step 8 after "promoted 3 more layers after step 2" (V2-Lite, seed YAML, max_gpu_memory 24GB = 22.35 GiB, the cap
    # on reserved memory): torch.OutOfMemoryError "Tried to allocate 364.00 MiB ... 22.35 GiB allowed; 20.28 GiB is
    # allocated by PyTorch, and 1.76 GiB is reserved by PyTorch but unallocated" (22.85 GiB in use is the process
    # with its CUDA context, which the cap does not count). Without the 3 promoted 1.03 GiB layers that moment
    # allocates 20.28 + 0.36 - 3.09 = 17.55 GiB; the rule printed a 22.7 GB peak = 18.05 GiB before the layers, so
    # the measured steps showed ~0.5 GiB of allocator overhead. The old rule (1 GiB margin) then fit 3 layers:
    # (22.35 - 18.05 - 1) / 1.03 = 3.2. With 3 layers that moment needs 17.55 + 3.09 + 1.76 + 0.36 > 22.35 GiB.
    budget, layer = 24 * GB, int(1.03 * GiB)
    measured = StepMemory(tokens=16384, start=int(12.0 * GiB), peak_allocated=int(17.55 * GiB),
                          peak_reserved=int(18.05 * GiB), end=int(12.0 * GiB))
    estimate = estimate_promotion([measured], worst_tokens=16384, budget=budget, layer_bytes=layer, candidates=20)
    assert (budget - measured.peak_reserved - GiB) // layer == 3  # the old rule's count, for the record
    assert 1 <= estimate.layers <= 2
    needed = measured.peak_allocated + estimate.layers * layer + int(1.76 * GiB) + 364 * 2**20
    assert needed <= budget  # the failing moment fits with the layers the rule gives
    # the failing step itself measured (3 layers promoted, its allocation as far as it got): no room for more
    failed = StepMemory(tokens=16384, start=int(15.1 * GiB), peak_allocated=int(20.64 * GiB),
                        peak_reserved=int(22.40 * GiB), end=int(15.1 * GiB))
    over = estimate_promotion([failed], worst_tokens=16384, budget=budget, layer_bytes=layer, candidates=17)
    assert over.layers == 0 and over.worst_bytes + over.margin > budget
    # said once in the run, with the numbers that decided it (the H200 box's fp8 run promoted nothing silently)
    line = no_promotion_line(8, over, layer, budget, 16384, streamed=17, layers=26)
    assert line == (f"no layer promoted after step 8: a 16,384-token pass is predicted to allocate "
                    f"{over.worst_bytes / 1e9:.1f} GB, +{over.margin / 1e9:.1f} GB kept free for fragmentation "
                    f"({over.fragmentation / 1e9:.1f} GB) and safety, leaving 0.0 GB of the 24.0 GB budget; a "
                    f"resident layer needs 1.1 GB; 17 of 26 MoE layers stream")


def test_seed_yaml_measured_at_its_largest_pass_promotes_two_layers_with_expandable_segments():
    # The H200 run (V2-Lite, seed YAML, max_gpu_memory 24GB, 6 resident, lock-step reference): peak 19.7e9 bytes
    # allocated at the run's largest pass, a resident layer 1.107e9 bytes. With the largest pass first, step 1
    # measures it (no scaling). Expandable segments: fragmentation max(0.3e9 measured, 3 % x 19.7e9 = 0.591e9),
    # margin 0.591e9 + 1 GiB = 1.665e9, room 24 - 19.7 - 1.665 = 2.635e9: two layers (peak 21.9e9), 8 of 26
    # resident. The default allocator's 10 % floor (1.97e9) leaves 1.256e9: one layer.
    layer, worst = int(1.107 * GB), int(19.7 * GB)
    between = int(13.7 * GB)  # weights, 6 resident layers, stream slots, LoRA + Adam (any value: start == end)
    step1 = StepMemory(tokens=15872, start=between, peak_allocated=worst, peak_reserved=worst + int(0.3 * GB),
                       end=between)
    expandable = estimate_promotion([step1], worst_tokens=15872, budget=24 * GB, layer_bytes=layer, candidates=20,
                                    expandable=True)
    assert expandable.worst_bytes == worst and expandable.fragmentation == int(0.03 * worst)
    assert expandable.margin == int(0.03 * worst) + GiB
    assert expandable.layers == 2
    assert (worst + 2 * layer) / GB == pytest.approx(21.914)
    default = estimate_promotion([step1], worst_tokens=15872, budget=24 * GB, layer_bytes=layer, candidates=20)
    assert default.fragmentation == int(0.10 * worst) and default.layers == 1
    # before the largest pass came first: step 1 was ~8k tokens (3.5e9 of activations, ~1e9 of them fixed), scaled
    # in proportion to the 16,384-token bound: 7e9, worst 20.7e9; the default allocator's margin 2.07e9 + 1 GiB
    # leaves no layer (the H200 run printed no promotion line)
    small = StepMemory(tokens=8192, start=between, peak_allocated=between + int(3.5 * GB),
                       peak_reserved=between + int(3.7 * GB), end=between)
    assert estimate_promotion([small], worst_tokens=16384, budget=24 * GB, layer_bytes=layer,
                              candidates=20).layers == 0
    # a measured fragmentation above the floor still counts: 1.2e9 of holes leaves room for one layer
    holes = StepMemory(tokens=15872, start=between, peak_allocated=worst, peak_reserved=worst + int(1.2 * GB),
                       end=between)
    assert estimate_promotion([holes], worst_tokens=15872, budget=24 * GB, layer_bytes=layer, candidates=20,
                              expandable=True).layers == 1


def test_run_epochs_counts_the_epochs_the_trainer_starts():
    assert run_epochs(300, 8, 40, 3.0) == 2  # 38 steps an epoch (the last one partial): 40 steps start a second
    assert run_epochs(300, 8, 38, 3.0) == 1
    assert run_epochs(300, 8, -1, 2.5) == 3
    assert run_epochs(300, 16, 0, 1.0) == 1


def test_margin_is_a_gib_or_four_percent_of_the_budget():
    assert safety_margin(24 * GB) == GiB
    assert safety_margin(80 * GB) == int(3.2 * GB)


def test_nothing_to_promote_on_a_cpu_run(tiny_model_dir, tmp_path):
    from kllama.config import build_config
    from kllama.model.load import load_model

    config = build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": str(tmp_path),
                           "stage": "dpo", "dataset": "dpo_en_demo", "use_kt": True, "expert_placement": "stream",
                           "max_gpu_memory": "24GB"})
    loaded = load_model(config, "train", device="cpu")
    assert build_promotion(config, loaded.engine, torch.device("cpu"), [], None, announce=True) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measured_step_promotes_streamed_layers_and_training_is_unchanged(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("deepseek_v2")
    # 8 GB: the load-time reserve (at least 8 GiB) keeps every layer streamed; the measured tiny step leaves room
    promoted = train_tiny_dpo(tmp_path / "promoted", model_dir, "max_gpu_memory=8GB")
    streamed = train_tiny_dpo(tmp_path / "streamed", model_dir)
    assert not [line for line in streamed.splitlines() if line.startswith("promoted ")]
    line = next(line for line in promoted.splitlines() if line.startswith("promoted "))
    assert "after step 1: peak" in line and "GB allocated of 8.0 GB budget" in line and "; 0 of " in line, line

    def history(out: Path) -> list[dict]:
        return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]

    # same kernels on the same weights: the same losses (the adapters are not compared element-wise: CUDA attention
    # backward may sum in another order, which Adam turns into +-lr for gradients near zero)
    promoted_losses = [h["loss"] for h in history(tmp_path / "promoted")]
    assert promoted_losses == pytest.approx([h["loss"] for h in history(tmp_path / "streamed")], abs=1e-5)
    assert len(promoted_losses) == 3 and abs(promoted_losses[-1] - promoted_losses[0]) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stream_slots_made_in_a_step_are_held_memory_not_its_activations(tiny_model_dir, tmp_path):
    # A run whose first pass is step 1 (reference log-probs from the cache) allocates the streamer's slots there;
    # they stay, so they belong to the memory between steps. Counted as activations too, the estimate held them twice.
    from kllama.config import build_config
    from kllama.model.load import load_model
    from kllama.train.promotion import ResidentPromotion

    config = build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": str(tmp_path),
                           "stage": "dpo", "dataset": "dpo_en_demo", "use_kt": True, "expert_placement": "stream"})
    loaded = load_model(config, "train", device="cuda")
    engine = loaded.engine
    assert engine.streamer is not None and engine.streamer.gpu_bytes() == 0  # no pass has run
    promotion = ResidentPromotion(engine, loaded.device, budget=0, worst_tokens=64, announce=False)
    promotion.on_step_begin(None, None, None)
    before = torch.cuda.memory_allocated(loaded.device)
    ids = torch.arange(64, device=loaded.device)[None] % loaded.model.config.vocab_size
    embeds = loaded.model.get_input_embeddings()(ids).detach().requires_grad_()  # a training pass (never split)
    loaded.model(inputs_embeds=embeds).logits.float().sum().backward()
    promotion.observe_pass(64)
    promotion.on_step_end(None, None, None)
    slots = engine.streamer.gpu_bytes()
    step = promotion.steps[0]
    assert slots > 0 and step.start == before + slots
    assert step.end >= step.start  # nothing else the step kept is counted as held twice
