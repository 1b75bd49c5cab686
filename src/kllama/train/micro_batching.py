"""Token-budget micro-batching: run one optimizer step's B x G rows in as few expert passes as the budget allows.

With routed experts held in host RAM every pass pays a fixed cost (streaming all layers' experts to the GPU, ~0.5 s
on DeepSeek-V2-Lite) whatever its token count, so LLaMA-Factory's `per_device_train_batch_size: 1` x
`gradient_accumulation_steps: 8` pays it eight times for eight ~1,000-token micro-steps. The same eight rows can run
as `8 / k` rows x `k` accumulation steps, where `k` is the smallest divisor of B*G (at most G: the user's own batch
is never split) whose merged micro-batch, at the data's longest row, fits `micro_batch_tokens`.

The step's gradient does not change: a DPO-family loss is a per-pair mean of its micro-batch and the Trainer divides
it by the accumulation steps, so equal-sized micro-batches give the step's per-pair mean however the rows are split;
SFT's loss is normalised by the step's label-token count (see `KllamaTrainer`). Losses whose value depends on the
micro-batch as a whole (`bco_pair`'s running mean, the router load-balancing loss) keep the user's batching.

Merged micro-batches are grouped by length (`LengthGroupedRows`) so padding stays small: the rows of an epoch are
shuffled, sorted by length inside windows of up to 50 steps, cut into steps, and the steps shuffled again; the order
is a function of (seed, epoch) only, so resuming from a checkpoint replays it exactly.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

from torch.utils.data import Dataset

PAD_MULTIPLE = 8  # the collators pad every batch to a multiple of 8 tokens
MAX_WINDOW_STEPS = 50

# stage -> (length columns of a row, sequences a row puts in the batch, what a row is called)
_STAGE_ROWS: dict[str, tuple[tuple[str, ...], int, str]] = {
    "dpo": (("chosen_input_ids", "rejected_input_ids"), 2, "pairs"),
    "sft": (("input_ids",), 1, "rows"),
}
# pref_loss values whose loss is not a plain mean over independent rows of the micro-batch
_WHOLE_BATCH_LOSSES: dict[str, str] = {
    "bco_pair": "bco_pair's reward baseline is a running mean over micro-batches",
}


def row_lengths(dataset: Any, stage: str) -> list[int]:
    """Padded-sequence length each row needs (the longer of chosen/rejected for pairs), read from Arrow columns."""
    import pyarrow.compute as pc

    columns = _STAGE_ROWS[stage][0]
    table = dataset.with_format("arrow")
    per_column = [pc.list_value_length(table[c]).to_pylist() for c in columns]
    return [max(values) for values in zip(*per_column)]


def padded(length: int) -> int:
    """`length` rounded up to the collators' multiple."""
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's rows run: `batch` rows per pass x `accumulation` passes (what the Trainer gets)."""

    user_batch: int
    user_accumulation: int
    batch: int
    accumulation: int
    longest: int = 0  # padded length of the longest row (tokens per sequence)
    sequences_per_row: int = 1
    budget: int = 0
    unit: str = "rows"

    @property
    def merged(self) -> bool:
        """Whether the plan changes the user's batching."""
        return self.batch != self.user_batch

    @property
    def pass_tokens(self) -> int:
        """Tokens of the largest pass: every sequence padded to the longest row."""
        return self.batch * self.sequences_per_row * self.longest


def plan_batches(user_batch: int, user_accumulation: int, longest: int, sequences_per_row: int, budget: int,
                 unit: str = "rows") -> BatchPlan:
    """The fewest passes per step (a divisor k of B*G, k <= G) whose merged micro-batch of B*G/k rows at the padded
    `longest` row length stays within `budget` tokens; k = G (the user's batching) when none does."""
    rows = user_batch * user_accumulation
    cost = sequences_per_row * padded(longest)
    passes = next((k for k in range(1, user_accumulation + 1)
                   if rows % k == 0 and (rows // k) * cost <= budget), user_accumulation)
    return BatchPlan(user_batch, user_accumulation, rows // passes, passes, padded(longest), sequences_per_row,
                     budget, unit)


def expert_passes(placements: Mapping[str, Any]) -> Counter:
    """How many MoE layers a training (long) pass streams, computes on the CPU, or finds resident."""
    return Counter(p.long for p in placements.values())


def _experts_phrase(targets: Counter) -> str:
    parts = {"stream": "streamed", "cpu": "on the CPU", "gpu": "resident"}
    held = [f"{targets[t]} {parts[t]}" for t in ("stream", "cpu", "gpu") if targets.get(t)]
    if set(targets) == {"stream"}:
        return f"experts streamed: each pass copies {targets['stream']} layers"
    if set(targets) == {"cpu"}:
        return f"experts on the CPU: each pass runs {targets['cpu']} layers there"
    return "experts host-held: each pass has " + ", ".join(held) + " layers"


def why_not_merged(*, use_kt: bool, targets: Counter, budget: int, loss_type: str | None,
                   router_aux_loss_coef: float | None) -> str | None:
    """Why micro-batches must keep the user's batching, or None when merging applies."""
    checks = (
        (not use_kt, "use_kt is off"),
        (budget <= 0, "micro_batch_tokens: 0 turns it off"),
        (use_kt and not (targets.get("stream") or targets.get("cpu")),
         "all routed experts are resident on the GPU: no per-pass copy to amortise"),
        (loss_type in _WHOLE_BATCH_LOSSES, _WHOLE_BATCH_LOSSES.get(loss_type or "", "")),
        (bool(router_aux_loss_coef), "the router load-balancing loss is a statistic of the whole micro-batch"),
    )
    return next((reason for failed, reason in checks if failed), None)


def describe(plan: BatchPlan, targets: Counter) -> str:
    """The one line printed at start: what was merged and why (or why not)."""
    user = f"{plan.user_batch} x {plan.user_accumulation} accumulation"
    pass_word = "pass" if plan.accumulation == 1 else "passes"
    sizes = (f"longest {plan.unit[:-1]} {plan.sequences_per_row} x {plan.longest:,} tokens; "
             f"budget {plan.budget:,} tokens (micro_batch_tokens)")
    if plan.merged:
        return (f"micro-batching: {user} -> {plan.batch} {plan.unit} x {plan.accumulation} {pass_word} per step "
                f"({_experts_phrase(targets)}; {sizes}; grouped by length)")
    return f"micro-batching: kept {user} (a merged micro-batch would exceed the budget: {sizes})"


class LengthGroupedRows(Dataset):
    """`rows` in a per-epoch order whose consecutive `step_rows` rows form one optimizer step of similar lengths.

    The order depends only on `seed + epoch` (set by accelerate's `set_epoch` before each epoch), so a resumed run
    sees the same steps. A partial last step (len % step_rows rows) stays at the end, as the Trainer expects.
    """

    def __init__(self, rows: Any, lengths: list[int], step_rows: int, seed: int) -> None:
        if len(lengths) != len(rows):
            raise ValueError(f"{len(lengths)} lengths for {len(rows)} rows")
        self.rows, self.lengths, self.step_rows, self.seed = rows, lengths, step_rows, seed
        self.epoch = 0
        self.order = grouped_order(lengths, step_rows, seed)

    def set_epoch(self, epoch: int) -> None:
        """Reorder for `epoch` (called by the data loader before each epoch)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.order = grouped_order(self.lengths, self.step_rows, self.seed + epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> Any:
        return self.rows[self.order[index]]


def grouped_order(lengths: list[int], step_rows: int, seed: int) -> list[int]:
    """Row indices: shuffled, sorted (longest first) within windows of whole steps, steps shuffled again."""
    rng = random.Random(seed)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    full = len(indices) - len(indices) % step_rows
    head, tail = indices[:full], indices[full:]
    # Like transformers' LengthGroupedSampler: windows of min(50, steps/4) steps keep some randomness in which
    # rows share a step while rows within a step have close lengths.
    window = step_rows * max(1, min(MAX_WINDOW_STEPS, full // step_rows // 4))
    steps: list[list[int]] = []
    for start in range(0, full, window):
        block = sorted(head[start:start + window], key=lambda i: -lengths[i])
        steps += [block[s:s + step_rows] for s in range(0, len(block), step_rows)]
    rng.shuffle(steps)
    return [i for step in steps for i in step] + sorted(tail, key=lambda i: -lengths[i])


def padding_fraction(lengths: list[int], order: list[int], batch: int) -> float:
    """Share of the padded tokens of micro-batches of `batch` consecutive rows of `order` that are padding beyond
    each row's own (padded) length: the padding merging adds (a pair's chosen/rejected mismatch is not counted)."""
    total = own = 0
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        total += len(rows) * padded(max(lengths[i] for i in rows))
        own += sum(padded(lengths[i]) for i in rows)
    return (total - own) / total if total else 0.0


def apply_micro_batching(config: Any, engine: Any, train_set: Any) -> tuple[Any, BatchPlan | None]:
    """Plan the step's micro-batches for this run and print the line saying what was merged (or why not).

    Returns the training rows (in a `LengthGroupedRows` order when merged) and the merged plan, or the rows
    unchanged and None when the user's batching stands (printed only when the engine is on and G > 1).
    """
    t, f = config.training, config.finetuning
    if train_set is None or t.gradient_accumulation_steps == 1 or not config.engine.use_kt:
        return train_set, None
    targets = expert_passes(engine.placements) if engine is not None else Counter()
    budget = t.micro_batch_tokens
    reason = why_not_merged(use_kt=True, targets=targets, budget=budget,
                            loss_type=f.pref_loss if f.stage == "dpo" else None,
                            router_aux_loss_coef=config.model.router_aux_loss_coef)
    user = f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation"
    if reason is not None:
        print(f"micro-batching: kept {user} ({reason})", flush=True)
        return train_set, None
    _, sequences, unit = _STAGE_ROWS[f.stage]
    lengths = row_lengths(train_set, f.stage)
    plan = plan_batches(t.per_device_train_batch_size, t.gradient_accumulation_steps, max(lengths), sequences,
                        budget, unit)
    line = describe(plan, targets)
    if not plan.merged:
        print(line, flush=True)
        return train_set, None
    train_set = LengthGroupedRows(train_set, lengths, plan.batch * plan.accumulation, t.seed)
    pad = padding_fraction(lengths, train_set.order, plan.batch)
    print(line[:-1] + f", {pad:.1%} padding)", flush=True)
    return train_set, plan
