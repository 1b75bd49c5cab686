"""Token-budget micro-batching: the plan, the length-grouped order, and merged == accumulated gradients."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from train_helpers import GradCapture

from kllama.train.allocator import ALLOC_CONF_VARS
from kllama.train.micro_batching import (
    BatchPlan,
    ChunkedCollator,
    LengthGroupedRows,
    StepShape,
    chunk_rows,
    grouped_order,
    largest_pass_tokens,
    padded,
    padding_fraction,
    pass_size,
    passes_per_step,
    planned_pass_tokens,
    row_lengths,
    why_not_merged,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("lengths,budget,want", [
    ([100] * 8, 16384, [[0, 1, 2, 3, 4, 5, 6, 7]]),                 # 8 pairs x 2 x 104 tokens: one pass
    ([2048] * 8, 16384, [[0, 1, 2, 3], [4, 5, 6, 7]]),             # 8 x 2 x 2048 = 32k: two passes of 4
    ([2048, 100, 100, 100, 100, 100, 100, 100], 4096, [[0], [1, 2, 3, 4, 5, 6, 7]]),  # per pass, its own longest
    ([5000, 10], 4096, [[0], [1]]),                                 # a row over budget runs alone
    ([10, 30, 20], 10**6, [[1, 2, 0]]),                             # longest first
    ([500, 500, 500], 4096, [[0, 1, 2]]),                           # lengths are padded to 8: 3 x 2 x 504 fits
    ([500, 500, 500], 3000, [[0, 1], [2]]),
])
def test_passes_pack_a_step_longest_first_within_the_budget(lengths, budget, want):
    passes = chunk_rows(lengths, 2, budget)
    assert passes == want
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    for part in passes:
        assert len(part) == 1 or len(part) * 2 * padded(max(lengths[i] for i in part)) <= budget


def test_chunked_collator_pads_each_pass_to_its_own_longest_row():
    from kllama.data import PairwiseCollator

    def row(n: int) -> dict:
        return {"chosen_input_ids": [5] * n, "chosen_labels": [5] * n, "rejected_input_ids": [6] * (n - 2),
                "rejected_labels": [6] * (n - 2)}

    collate = ChunkedCollator(PairwiseCollator(0, pad_to_multiple_of=8), "dpo", budget=2 * 2 * 64)
    batch = collate([row(10), row(60), row(12), row(58)])
    shapes = [tuple(c["input_ids"].shape) for c in batch["chunks"]]
    assert shapes == [(4, 64), (4, 16)]  # [60, 58] then [12, 10], chosen + rejected halves


@pytest.mark.parametrize("packed,shared", [(False, False), (True, False), (True, True)])
def test_a_collated_pass_counts_its_tokens_as_the_plan_does(packed, shared):
    """What the trainer reports of each pass to the layer promotion (`planned_pass_tokens`) is what the plan counted
    for those rows (`pass_size` of their row lengths), padded, packed, and packed with each pair's prompt computed
    once (the plan counts the tokens computed: fewer than the rows hold)."""
    from kllama.data import PairwiseCollator

    def row(prompt: int, chosen: int, rejected: int) -> dict:
        ids = list(range(3, 3 + prompt))
        return {"chosen_input_ids": ids + [7] * chosen, "chosen_labels": [-100] * prompt + [7] * chosen,
                "rejected_input_ids": ids + [9] * rejected, "rejected_labels": [-100] * prompt + [9] * rejected}

    rows = [row(30, 12, 40), row(5, 60, 3), row(17, 17, 17)]
    collate = PairwiseCollator(0, pad_to_multiple_of=8, packed=packed, share_prompts=shared)
    chunked = ChunkedCollator(collate, "dpo", budget=10**6, packed=packed, shared=shared)
    batch = collate(rows)
    want = pass_size([chunked.row_length(r) for r in rows], 2, packed)
    assert planned_pass_tokens(batch) == want
    if shared:  # the prompts (30, 5 and 17 tokens) once each: 3 pairs x (P - 1) fewer tokens than the rows hold
        held = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
        assert want == held - (29 + 4 + 16)


def test_merging_is_off_where_nothing_is_amortised_or_the_loss_needs_the_whole_batch():
    streamed = Counter(stream=26)
    base = {"use_kt": True, "targets": streamed, "budget": 16384, "loss_type": "sigmoid"}
    assert why_not_merged(**base) is None
    assert why_not_merged(**{**base, "targets": Counter(cpu=3)}) is None
    assert why_not_merged(**{**base, "targets": Counter(gpu=3, stream=1)}) is None
    assert "resident" in why_not_merged(**{**base, "targets": Counter(gpu=26)})
    assert "use_kt" in why_not_merged(**{**base, "use_kt": False})
    assert "0 turns it off" in why_not_merged(**{**base, "budget": 0})
    assert "bco_pair" in why_not_merged(**{**base, "loss_type": "bco_pair"})


def test_grouped_order_is_a_seeded_permutation_of_whole_steps_with_the_partial_step_last():
    lengths = [(i * 37) % 101 + 1 for i in range(203)]
    order = grouped_order(lengths, 8, seed=5)
    assert sorted(order) == list(range(203))
    assert order == grouped_order(lengths, 8, seed=5)
    assert order != grouped_order(lengths, 8, seed=6)
    steps = [order[s:s + 8] for s in range(0, 200, 8)]
    assert all([lengths[i] for i in step] == sorted((lengths[i] for i in step), reverse=True) for step in steps)
    # steps are not in length order across the epoch (they are shuffled after grouping)
    assert [lengths[s[0]] for s in steps] != sorted((lengths[s[0]] for s in steps), reverse=True)
    rows = LengthGroupedRows(list(range(203)), lengths, 8, seed=5)
    assert [rows[i] for i in range(len(rows))] == order
    rows.set_epoch(1)
    assert [rows[i] for i in range(len(rows))] == grouped_order(lengths, 8, seed=6)


def _steps(order: list[int], step_rows: int, full: int) -> list[tuple[int, ...]]:
    return [tuple(order[s:s + step_rows]) for s in range(0, full, step_rows)]


@pytest.mark.parametrize("rank_rows", [8, 4])  # one rank, or two ranks of 4 rows in a step of 8
def test_the_step_of_the_largest_pass_runs_first_and_the_steps_stay_the_same(rank_rows):
    lengths = [(i * 389) % 1500 + 20 for i in range(203)]
    shape = StepShape(rank_rows, 2, 4096)
    for seed in range(4):
        plain = grouped_order(lengths, 8, seed)
        order = grouped_order(lengths, 8, seed, shape)
        assert order == grouped_order(lengths, 8, seed, shape)  # a function of the seed: resume replays it
        steps, before = _steps(order, 8, 200), _steps(plain, 8, 200)
        assert sorted(steps) == sorted(before) and order[200:] == plain[200:]  # same steps, partial step last
        sizes = [shape.largest_pass([lengths[i] for i in step]) for step in steps]
        assert sizes[0] == max(sizes)
        assert steps[1:] == [step for step in before if step != steps[0]]  # the others keep their shuffled order
    # the largest pass of a step is a pass chunk_rows makes of one rank's rows
    step = [1500, 1400, 1300, 100, 90, 80, 70, 60]
    assert StepShape(8, 2, 4096).largest_pass(step) == 2 * padded(1500)  # each long row alone
    assert StepShape(4, 2, 10**6).largest_pass(step) == 4 * 2 * padded(1500)  # rank 0's 4 rows in one pass


def test_the_run_worst_pass_is_the_real_largest_of_its_epochs_within_the_bound():
    lengths = [(i * 389) % 1500 + 20 for i in range(203)]
    shape = StepShape(8, 2, 16384)
    rows = LengthGroupedRows(list(range(203)), lengths, 8, seed=1, shape=shape)
    per_epoch = [max(shape.largest_pass([lengths[i] for i in rows.order_of(e)[s:s + 8]]) for s in range(0, 203, 8))
                 for e in range(3)]
    assert rows.largest_pass(3) == max(per_epoch) and rows.largest_pass(1) == per_epoch[0]
    whole_steps = [shape.largest_pass([lengths[i] for i in rows.order[s:s + 8]]) for s in range(0, 200, 8)]
    assert whole_steps[0] == max(whole_steps)  # the partial last step (3 rows) is the only one that could hold more
    assert rows.largest_pass(3) <= largest_pass_tokens(lengths, 2, 8, 16384)


def test_padding_stays_under_ten_percent_on_the_bundled_demo_with_the_seed_batching(tiny_model_dir):
    from kllama.config import build_config
    from kllama.data import build_dataset, get_template
    from transformers import AutoTokenizer

    config = build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": "/nonexistent/o",
                           "stage": "dpo", "dataset": "dpo_en_demo", "template": "llama3", "cutoff_len": 2048,
                           "max_samples": 1000, "per_device_train_batch_size": 1,
                           "gradient_accumulation_steps": 8})
    tokenizer = AutoTokenizer.from_pretrained(config.model.model_name_or_path)
    train = build_dataset(config.data, tokenizer, get_template("llama3", tokenizer), stage="dpo", seed=42).train
    lengths = row_lengths(train, "dpo")
    assert lengths == [max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in train]
    budget = config.training.micro_batch_tokens
    for epoch in range(3):
        order = grouped_order(lengths, 8, seed=42 + epoch)
        assert padding_fraction(lengths, order, 8, 2, budget) < 0.10
        assert passes_per_step(lengths, order, 8, 2, budget) == {1: -(-len(lengths) // 8)}  # short rows: one pass
    # the same merge on random steps would pad far more: the grouping is what keeps it small
    assert padding_fraction(lengths, list(range(len(lengths))), 8, 2, budget) > 0.2


def test_shared_row_lengths_from_arrow_are_the_collated_shared_passes(tiny_model_dir):
    """Prefix sharing's plan reads each row's tokens computed (chosen + rejected less the P - 1 prompt tokens shared)
    from the Arrow columns: the same as one row at a time (`shared_row_length`) and as the packed shared pass of
    those rows computes, on the bundled demo pairs (real prompts); every pair shares its prompt."""
    from transformers import AutoTokenizer

    from kllama.config import build_config
    from kllama.data import PairwiseCollator, build_dataset, get_template
    from kllama.train.micro_batching import shared_row_length

    config = build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": "/nonexistent/o",
                           "stage": "dpo", "dataset": "dpo_en_demo", "template": "llama3", "cutoff_len": 512,
                           "max_samples": 64})
    tokenizer = AutoTokenizer.from_pretrained(config.model.model_name_or_path)
    train = build_dataset(config.data, tokenizer, get_template("llama3", tokenizer), stage="dpo", seed=42).train
    shared = row_lengths(train, "dpo", packed=True, shared=True)
    rows = list(train)
    assert shared == [shared_row_length(r) for r in rows]
    assert all(s < p for s, p in zip(shared, row_lengths(train, "dpo", packed=True)))
    collate = PairwiseCollator(tokenizer.pad_token_id, packed=True, share_prompts=True)
    assert collate(rows[:8])["input_ids"].numel() == sum(shared[:8])


def first_step(model_dir: Path, tmp: Path, settings: dict, budget: int | None) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the first optimizer step, with the rows of a 4-row step in the grouped order: as 1 x 4
    accumulated micro-steps (`budget` None) or as one step batch run in passes of `budget` tokens; with
    `padding_free: true` in `settings` every batch (the precompute's too) is packed and `budget` counts real tokens
    (the step's rows are the same either way: grouped by their padded lengths); with `prefix_sharing: true` too
    every packed pair computes its prompt once."""
    from kllama.config import build_config
    from kllama.data import PairwiseCollator, SFTCollator, build_dataset, get_template
    from kllama.model.adapters import attach_lora, resolve_lora_spec
    from kllama.model.load import load_model
    from kllama.train.reference import attach_reference_logps, with_reference_columns
    from kllama.train.run import build_training_arguments, preference_settings
    from kllama.train.trainer import KllamaTrainer
    from transformers import set_seed

    config = build_config({
        "model_name_or_path": str(model_dir), "output_dir": str(tmp / f"b{budget}"), "template": "deepseek",
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
        "cutoff_len": 64, "max_samples": 12, "max_steps": 1, "logging_steps": 1, "use_kt": True,
        "expert_placement": "cpu", "lora_rank": 4, "seed": 3, "disable_tqdm": True, **settings,
    })
    stage = config.finetuning.stage
    packed = bool(config.training.padding_free)
    set_seed(3)
    loaded = load_model(config, "train")
    bundle = build_dataset(config.data, loaded.tokenizer, get_template(config.data.template, loaded.tokenizer),
                           stage=stage, seed=3)
    f = config.finetuning
    model = attach_lora(loaded.model, resolve_lora_spec(loaded.model, f.lora_target, f.lora_rank, None, 0.0), seed=3)
    with torch.no_grad():  # non-zero B so every LoRA tensor gets a gradient and the reference differs
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(len(name)))
    if stage == "dpo":
        collate = PairwiseCollator(loaded.tokenizer.pad_token_id, packed=packed, share_prompts=f.prefix_sharing)
    else:
        collate = SFTCollator(loaded.tokenizer.pad_token_id, packed=packed)
    rows = bundle.train
    if f.precompute_ref_log_probs:
        rows = attach_reference_logps(model, rows, collate, None, tmp / "cache",
                                      batch_size=5, device=loaded.device)
        collate = with_reference_columns(collate)
    ordered = LengthGroupedRows(rows, row_lengths(rows, stage), 4, seed=3)
    plan = None
    if budget is not None:
        plan = BatchPlan(1, 4, budget, 2 if stage == "dpo" else 1, packed=packed)
        collate = ChunkedCollator(collate, stage, budget, packed, bool(f.prefix_sharing))
    args = build_training_arguments(config, has_eval=False, use_cpu=loaded.device.type == "cpu", plan=plan)
    args.train_sampling_strategy = "sequential"  # both runs see the grouped order's first step
    capture = GradCapture()
    trainer = KllamaTrainer(
        model=model, args=args,
        train_dataset=ordered, data_collator=collate, processing_class=loaded.tokenizer, callbacks=[capture],
        settings=preference_settings(config, loaded.model.config),
    )
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, capture.grads


CASES = {
    "sigmoid": {"stage": "dpo", "dataset": "dpo_en_demo", "pref_loss": "sigmoid"},
    "orpo": {"stage": "dpo", "dataset": "dpo_en_demo", "pref_loss": "orpo"},
    "simpo": {"stage": "dpo", "dataset": "dpo_en_demo", "pref_loss": "simpo", "pref_beta": 2.0},
    "sft": {"stage": "sft", "dataset": "alpaca_en_demo"},
    "precomputed-ref": {"stage": "dpo", "dataset": "dpo_en_demo", "precompute_ref_log_probs": True},
    "ld-dpo": {"stage": "dpo", "dataset": "dpo_en_demo", "pref_loss": "sigmoid", "ld_alpha": 0.5},
}


# every loss in one pass; passes of unequal size (300 tokens: 2 rows, then 1, ...) and one pass per row where the
# weighting differs most (DPO per-pair means, SFT token means, cached reference columns); each loss again packed
# (padding-free), against the same padded micro-steps
STEP_CASES = ([(case, 10**6, False) for case in CASES] + [("sigmoid", 300, False), ("sft", 300, False),
                                                          ("precomputed-ref", 1, False)]
              + [(case, 10**6, True) for case in CASES] + [("sigmoid", 300, True), ("sft", 300, True)])


@pytest.fixture(scope="module")
def accumulated_step(tiny_model_dir, tmp_path_factory) -> Callable[[str], tuple[float, dict[str, torch.Tensor]]]:
    """case -> `first_step` of its 1 x 4 accumulated micro-steps, run once per case: every merged or packed variant
    of a case is compared with the same reference."""
    done: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}

    def get(case: str) -> tuple[float, dict[str, torch.Tensor]]:
        if case not in done:
            done[case] = first_step(tiny_model_dir("deepseek_v2"), tmp_path_factory.mktemp(f"accumulated-{case}"),
                                    CASES[case], None)
        return done[case]

    return get


@pytest.mark.parametrize("case,budget,packed", STEP_CASES,
                         ids=[f"{c}-{b}{'-packed' if p else ''}" for c, b, p in STEP_CASES])
def test_merged_step_equals_accumulated_micro_steps(case, budget, packed, accumulated_step, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("deepseek_v2")
    loss_a, grads_a = accumulated_step(case)
    loss_b, grads_b = first_step(model_dir, tmp_path / "b", {**CASES[case], "padding_free": packed}, budget)
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(".experts." in k for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ALLOC_CONF_VARS}  # kllama train chooses the allocator
    out = subprocess.run([sys.executable, "-m", "kllama.cli", "train", *args], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_cli_prints_the_merge_and_resumes_exactly_across_an_epoch(tiny_model_dir, tmp_path, capsys):
    """The full run is a real `kllama train` process; the resume runs the same `main` in this process (an
    interpreter start and the imports less, ~3 s on a 2-core CI machine)."""
    from kllama.cli import main

    common = [f"model_name_or_path={tiny_model_dir('deepseek_v2')}", "stage=dpo", "dataset=dpo_en_demo",
              "template=deepseek", "cutoff_len=64", "max_samples=10", "per_device_train_batch_size=1",
              "gradient_accumulation_steps=4", "num_train_epochs=2", "save_steps=4", "logging_steps=1",
              "learning_rate=5e-3", "use_kt=true", "expert_placement=cpu", "lora_rank=4", "seed=11",
              "disable_tqdm=true", "dataloader_num_workers=2", "padding_free=true"]
    full = _train(*common, f"output_dir={tmp_path / 'full'}")
    assert ("micro-batching: 1 x 4 accumulation -> each step's 4 pairs in as few passes of up to 16,384 tokens as fit "
            "(micro_batch_tokens; experts on the CPU") in full.stdout
    assert "first epoch: 3 steps, 3 in 1 pass" in full.stdout
    assert "; packed (padding-free), " in full.stdout  # asked for
    assert "each epoch starts with its largest pass (" in full.stdout
    assert "GPU allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by kllama train" in full.stdout
    reference = _losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, 7))  # 10 rows, 4 per step: 3 steps per epoch (the last has 2 rows)
    capsys.readouterr()
    assert main(["train", *common, f"output_dir={tmp_path / 'resumed'}",
                 f"resume_from_checkpoint={tmp_path / 'full' / 'checkpoint-4'}"]) == 0  # inside the 2nd epoch
    assert "resuming from" in capsys.readouterr().out
    losses = _losses(tmp_path / "resumed")
    for step in (5, 6):
        assert losses[step] == pytest.approx(reference[step], abs=1e-6), step


def test_reference_precompute_budget_only_for_host_held_experts_without_a_fixed_batch(tiny_model_dir):
    from types import SimpleNamespace

    from kllama.config import build_config
    from kllama.experts.placement import ExpertPlacement
    from kllama.train.micro_batching import NO_GRAD_BUDGET_FACTOR, reference_pass_budget

    def engine(mode: str) -> SimpleNamespace:
        return SimpleNamespace(placements={f"l{i}": ExpertPlacement.from_mode(mode) for i in range(3)})

    base = {"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": "/nonexistent/o", "stage": "dpo",
            "dataset": "dpo_en_demo", "use_kt": True, "precompute_ref_log_probs": True}
    config = build_config(base)
    assert reference_pass_budget(config, engine("stream")) == NO_GRAD_BUDGET_FACTOR * 16384
    assert reference_pass_budget(config, engine("cpu")) == NO_GRAD_BUDGET_FACTOR * 16384
    assert reference_pass_budget(config, engine("gpu")) is None
    assert reference_pass_budget(build_config({**base, "precompute_ref_batch_size": 4}), engine("stream")) is None
    assert reference_pass_budget(build_config({**base, "micro_batch_tokens": 0}), engine("stream")) is None


def test_router_aux_loss_is_averaged_over_passes_by_rows_and_keeps_merging_on(tiny_model_dir, tmp_path):
    """Qwen3-MoE's config carries a router aux coefficient: merging stays on, and a step run in passes adds
    coef x (row-weighted mean of the passes' aux losses), as accumulation averages it over micro-batches -- not the
    sum over passes."""
    model_dir = tiny_model_dir("qwen3_moe")
    base = {"stage": "sft", "dataset": "alpaca_en_demo", "template": "qwen"}
    aux_part = {}
    for name, budget in (("one pass", 10**6), ("pass per row", 1)):
        with_aux, _ = first_step(model_dir, tmp_path / f"{budget}a", base, budget)
        without, _ = first_step(model_dir, tmp_path / f"{budget}b", {**base, "router_aux_loss_coef": 0.0}, budget)
        aux_part[name] = with_aux - without
    assert aux_part["one pass"] > 0
    # 4 passes: a sum would be ~4x the one-pass value; the row-weighted mean stays near it
    assert 0.5 < aux_part["pass per row"] / aux_part["one pass"] < 1.5, aux_part
    assert why_not_merged(use_kt=True, targets=Counter(stream=3), budget=16384, loss_type=None) is None


def test_precomputed_reference_gives_the_in_step_loss_and_gradients_in_a_step_of_several_passes(tiny_model_dir,
                                                                                                 tmp_path):
    """The cached reference columns follow their rows through the merged step's passes (issue #11 suspected them):
    the first step's loss and gradients equal those with the reference computed inside the step."""
    model_dir = tiny_model_dir("deepseek_v2")
    loss_a, grads_a = first_step(model_dir, tmp_path / "a", CASES["sigmoid"], 300)
    loss_b, grads_b = first_step(model_dir, tmp_path / "b", CASES["precomputed-ref"], 300)
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
