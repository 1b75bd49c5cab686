"""Token-budget micro-batching: run one optimizer step's B x G rows in as few expert passes as the budget allows.

With routed experts held in host RAM every pass pays a fixed cost (streaming all layers' experts to the GPU, ~0.5 s
on DeepSeek-V2-Lite) whatever its token count, so LLaMA-Factory's `per_device_train_batch_size: 1` x
`gradient_accumulation_steps: 8` pays it eight times for eight ~1,000-token micro-steps. Instead the Trainer gets
each optimizer step's B*G rows as one batch, and the step runs them in passes of at most `micro_batch_tokens` padded
tokens each, decided per step from the rows' real lengths (`chunk_rows`): a step of short rows runs in one pass, a
step of long rows in two or more, each padded only to its own longest row.

The step's gradient does not change: `KllamaTrainer.compute_loss` back-propagates every pass but the last itself
(outside gradient synchronisation) and weights each pass's loss by its share of the step -- a DPO-family pass by its
share of the step's pairs (the losses are per-pair means), an SFT pass by the step's label-token count -- so the sum
is the loss of the step's rows in one batch, i.e. what gradient accumulation computes. Losses whose value depends on
the micro-batch as a whole keep the user's batching (`bco_pair`'s running mean). The router load-balancing loss is a
statistic of the tokens of one forward pass: with merging it is computed per pass and averaged over the step's passes
weighted by their rows, as accumulation averages it over micro-batches (its value shifts slightly with how tokens
are grouped, as it does with any change of batch size).

Merged micro-batches are grouped by length (`LengthGroupedRows`) so padding stays small: the rows of an epoch are
shuffled, sorted by length inside windows of up to 50 steps, cut into steps, and the steps shuffled again; then the
step holding the epoch's largest pass (padded tokens) moves to the front, as transformers' LengthGroupedSampler puts
its longest batch first "to OOM early": the first step's measured GPU memory is then the worst of the epoch, which is
what `kllama.train.promotion` needs to make more layers resident after step 1. The order is a function of
(seed, epoch) only, so resuming from a checkpoint replays it exactly.

Packed passes (`kllama.train.packing`, `padding_free`) hold their rows' sequences in one row without padding: a
row's length is then its sequences' total (chosen + rejected) and a pass's size the sum of its rows' lengths, so
the budget counts real tokens; a step's rows go into as few passes as first-fit decreasing finds, balanced so its
largest pass is as small as that count allows (`packed_passes`). Packed steps are not grouped by length (nothing to
save, and grouped steps of long rows overflow the budget more often); the largest pass still runs first.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

from torch.utils.data import Dataset

from kllama.data.collate import shared_prompt_length
from kllama.train.distributed import world_size

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


def row_lengths(dataset: Any, stage: str, packed: bool = False, shared: bool = False) -> list[int]:
    """Tokens each row puts in a pass, read from Arrow columns: padded, its longest sequence's length (the longer of
    chosen/rejected for pairs; every sequence of the pass is padded to the longest row's); packed, all its
    sequences' tokens (chosen + rejected); `shared` (packed pairs, prefix sharing), less the prompt tokens the
    rejected sequence does not repeat (`shared_row_length`)."""
    import pyarrow.compute as pc

    columns = _STAGE_ROWS[stage][0]
    table = dataset.with_format("arrow")
    per_column = [pc.list_value_length(table[c]).to_pylist() for c in columns]
    combine = sum if packed else max
    lengths = [combine(values) for values in zip(*per_column)]
    if shared and packed and stage == "dpo":
        saved = _prompt_tokens_saved(table)
        lengths = [n - s for n, s in zip(lengths, saved)]
    return lengths


def shared_row_length(row: Mapping[str, Any]) -> int:
    """A preference row's tokens in a prefix-shared packed pass: chosen + rejected, less the P - 1 prompt tokens the
    rejected sequence leaves to the chosen one (`shared_prompt_length`: P, or 0 when nothing is shared)."""
    prompt = shared_prompt_length(row["chosen_input_ids"], row["chosen_labels"], row["rejected_input_ids"],
                                  row["rejected_labels"])
    return len(row["chosen_input_ids"]) + len(row["rejected_input_ids"]) - max(prompt - 1, 0)


def _prompt_tokens_saved(table: Any) -> list[int]:
    """Per row of an Arrow table of preference rows, the prompt tokens prefix sharing saves (`shared_row_length`),
    from the flat id and label buffers (numpy views; no Python list per row)."""
    import numpy as np

    def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
        column = table[name].combine_chunks()
        return column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy()

    (c_ids, c_off), (c_lab, _), (r_ids, r_off), (r_lab, _) = (
        flat(n) for n in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"))
    saved = []
    for i in range(len(c_off) - 1):
        a, b = slice(c_off[i], c_off[i + 1]), slice(r_off[i], r_off[i + 1])
        saved.append(max(shared_prompt_length(c_ids[a], c_lab[a], r_ids[b], r_lab[b]) - 1, 0))
    return saved


def padded(length: int) -> int:
    """`length` rounded up to the collators' multiple."""
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's rows run: the Trainer gets all `step_rows` rows of a step as one batch, and the
    step's rows are split into passes of at most `budget` padded tokens each (`chunk_rows`)."""

    user_batch: int
    user_accumulation: int
    budget: int
    sequences_per_row: int = 1
    unit: str = "rows"
    packed: bool = False  # padding-free passes: `budget` counts real tokens (`kllama.train.packing`)
    shared: bool = False  # packed pairs with each prompt computed once: `budget` counts the tokens computed

    @property
    def step_rows(self) -> int:
        """Rows of one optimizer step (B x G)."""
        return self.user_batch * self.user_accumulation

    @property
    def batch(self) -> int:
        """Per-device batch the Trainer sees: a whole step."""
        return self.step_rows

    @property
    def accumulation(self) -> int:
        """Accumulation steps the Trainer sees: one (the passes of a step run inside it)."""
        return 1


def pass_size(lengths: list[int], sequences_per_row: int, packed: bool = False) -> int:
    """Tokens of one pass of rows of `lengths` (`row_lengths`): packed, their sum; padded, every sequence padded to
    the longest row."""
    return sum(lengths) if packed else len(lengths) * sequences_per_row * padded(max(lengths))


def planned_pass_tokens(batch: Mapping[str, Any]) -> int:
    """A collated pass's tokens in the units a plan counts them (`pass_size` of its rows' `row_lengths`): the
    tokens it computes, padding included where it pads (a prefix-shared pass: each pair's prompt once, as the
    plan's shared row lengths count it). What GPU memory per planned token is measured in
    (`ResidentPromotion.observe_pass`)."""
    return int(batch["input_ids"].numel())


def chunk_rows(lengths: list[int], sequences_per_row: int, budget: int, packed: bool = False) -> list[list[int]]:
    """Split one step's rows (by index into `lengths`) into passes: padded, rows longest first, each pass as many
    rows as fit `budget` tokens when padded to the pass's longest row; packed, `packed_passes`. A row longer than
    the budget runs alone. The first pass is the step's largest."""
    if packed:
        return packed_passes(lengths, budget)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    passes: list[list[int]] = []
    for i in order:
        if passes and pass_size([lengths[j] for j in (*passes[-1], i)], sequences_per_row, packed) <= budget:
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


def packed_passes(lengths: list[int], budget: int) -> list[list[int]]:
    """Packed passes of rows of `lengths` real tokens: as few as first-fit decreasing finds under `budget` (each
    pass costs a copy of the streamed layers), then the rows dealt again over that many passes longest first, each
    to the pass holding the fewest tokens, where that keeps every pass of several rows within the budget: the
    largest pass, which sets the step's GPU memory (what promotion can keep resident), shrinks toward the step's
    mean. Largest pass first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    fitted: list[list[int]] = []
    for i in order:
        target = next((p for p in fitted if sum(lengths[j] for j in p) + lengths[i] <= budget), None)
        if target is None:
            fitted.append([i])
        else:
            target.append(i)
    dealt: list[list[int]] = [[] for _ in fitted]
    for i in order:
        min(dealt, key=lambda p: sum(lengths[j] for j in p)).append(i)
    fits = all(len(p) == 1 or sum(lengths[j] for j in p) <= budget for p in dealt)
    chosen = dealt if fits and all(dealt) else fitted
    return sorted(chosen, key=lambda p: -sum(lengths[j] for j in p))


class ChunkedCollator:
    """Collates one optimizer step's rows as `{"chunks": [batch, ...]}`: one batch per pass (`chunk_rows`), each
    padded only to its own longest row, or packed (`packed`: `collate` packs, and the budget counts real tokens).
    `KllamaTrainer.compute_loss` runs the passes one after the other and weights each pass's loss by its share of
    the step, so the gradient is that of the step's rows in one batch."""

    def __init__(self, collate: Any, stage: str, budget: int, packed: bool = False, shared: bool = False) -> None:
        self.collate, self.budget, self.packed = collate, budget, packed
        self.columns, self.sequences_per_row, _ = _STAGE_ROWS[stage]
        self.shared = shared  # `collate` computes each pair's prompt once (packed pairs only)

    def row_length(self, row: Mapping[str, Any]) -> int:
        """A row's `row_lengths` value: its longest sequence's tokens, packed all its sequences' tokens, or with
        prefix sharing those less the prompt tokens shared (`shared_row_length`)."""
        if self.shared:
            return shared_row_length(row)
        return (sum if self.packed else max)(len(row[c]) for c in self.columns)

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, Any]:
        parts = chunk_rows([self.row_length(r) for r in rows], self.sequences_per_row, self.budget, self.packed)
        return {"chunks": [self.collate([rows[i] for i in part]) for part in parts]}


def pass_tokens(lengths: list[int], sequences_per_row: int, budget: int, packed: bool = False) -> list[int]:
    """Tokens (padded, or real when packed) of each pass `chunk_rows` makes of one step's rows."""
    return [pass_size([lengths[i] for i in part], sequences_per_row, packed)
            for part in chunk_rows(lengths, sequences_per_row, budget, packed)]


@dataclass(frozen=True)
class StepShape:
    """How a global step's rows become passes: `rank_rows` consecutive rows per data-parallel rank, each rank's rows
    split by `chunk_rows` with `sequences_per_row`, `budget` and `packed`."""

    rank_rows: int
    sequences_per_row: int
    budget: int
    packed: bool = False

    def largest_pass(self, lengths: list[int]) -> int:
        """Tokens of the largest pass any rank runs for a global step of rows of `lengths`."""
        return max((t for r in range(0, len(lengths), self.rank_rows)
                    for t in pass_tokens(lengths[r:r + self.rank_rows], self.sequences_per_row, self.budget,
                                         self.packed)),
                   default=0)


def largest_pass_tokens(lengths: list[int], sequences_per_row: int, rows_per_step: int, budget: int,
                        packed: bool = False) -> int:
    """The most tokens one pass can hold, whatever order the rows come in: `chunk_rows` starts a pass with its
    longest row (padded length L) and adds rows no longer than L while they fit `budget`, so such a pass holds at most
    min(rows_per_step, budget // (sequences_per_row x L), rows no longer than L) rows (at least the one). With
    `budget` 0 (user batching: each pass is a micro-batch of `rows_per_step` rows) only the row counts bound it.
    Packed (`lengths` are rows' real tokens), a pass is the longest row alone or at most `budget` tokens of at most
    `rows_per_step` rows."""
    if packed:
        largest = sum(sorted(lengths)[-rows_per_step:]) if rows_per_step > 0 else 0
        return max(max(lengths, default=0), min(largest, budget) if budget > 0 else largest)
    best = 0
    for count, length in enumerate(sorted(padded(n) for n in lengths), start=1):
        per_row = sequences_per_row * length
        fit = max(1, budget // per_row) if budget > 0 else rows_per_step
        best = max(best, min(rows_per_step, fit, count) * per_row)
    return best


def worst_pass_tokens(train_rows: Any, stage: str, plan: BatchPlan | None, per_device_batch: int,
                      epochs: int | None = None, shared: bool = False) -> int:
    """The largest pass a run's training rows make: the real one of the `epochs` the run sees when the rows are a
    `LengthGroupedRows` that knows its steps' shape, else `largest_pass_tokens` (a bound over every order) under a
    micro-batching `plan`, or for the user's own per-device micro-batches when `plan` is None."""
    if isinstance(train_rows, LengthGroupedRows) and train_rows.shape is not None and epochs:
        return train_rows.largest_pass(epochs)
    packed = plan is not None and plan.packed
    lengths = (train_rows.lengths if isinstance(train_rows, LengthGroupedRows)
               else row_lengths(train_rows, stage, packed, shared))
    sequences = _STAGE_ROWS[stage][1]
    if plan is None:
        return largest_pass_tokens(lengths, sequences, per_device_batch, 0)
    return largest_pass_tokens(lengths, sequences, plan.step_rows, plan.budget, packed)


def passes_per_step(lengths: list[int], order: list[int], step_rows: int, sequences_per_row: int,
                    budget: int, packed: bool = False) -> Counter:
    """How many steps of an epoch in `order` run in 1, 2, ... passes."""
    return Counter(len(chunk_rows([lengths[i] for i in order[s:s + step_rows]], sequences_per_row, budget, packed))
                   for s in range(0, len(order), step_rows))


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
                   ) -> str | None:
    """Why micro-batches must keep the user's batching, or None when merging applies."""
    checks = (
        (not use_kt, "use_kt is off"),
        (budget <= 0, "micro_batch_tokens: 0 turns it off"),
        (use_kt and not (targets.get("stream") or targets.get("cpu")),
         "all routed experts are resident on the GPU: no per-pass copy to amortise"),
        (loss_type in _WHOLE_BATCH_LOSSES, _WHOLE_BATCH_LOSSES.get(loss_type or "", "")),
    )
    return next((reason for failed, reason in checks if failed), None)


def layout_phrase(plan: BatchPlan, lengths: list[int], order: list[int], passes: Counter) -> str:
    """How an epoch's passes are laid out, for `describe`: the padding share, or packed the real tokens a pass
    holds on average."""
    if plan.packed:
        per_pass = sum(lengths[i] for i in order) / max(1, sum(n * count for n, count in passes.items()))
        what = "tokens computed (each pair's prompt once)" if plan.shared else "real tokens"
        return (f"packed (padding-free), {per_pass:,.0f} {what} per pass on average, steps not grouped by "
                "length (no padding to save; fewer steps over the budget)")
    pad = padding_fraction(lengths, order, plan.step_rows, plan.sequences_per_row, plan.budget)
    return f"grouped by length, {pad:.1%} padding"


def describe(plan: BatchPlan, targets: Counter, passes: Counter, layout: str, first_pass: int) -> str:
    """The one line printed at start: what was merged and why, how (`layout_phrase`), and the first step's largest
    pass."""
    spread = ", ".join(f"{count} in {n} pass{'es' if n > 1 else ''}" for n, count in sorted(passes.items()))
    kind = "computed" if plan.shared else "real" if plan.packed else "padded"
    return (f"micro-batching: {plan.user_batch} x {plan.user_accumulation} accumulation -> each step's "
            f"{plan.step_rows} {plan.unit} in as few passes of up to {plan.budget:,} tokens as fit "
            f"(micro_batch_tokens; {_experts_phrase(targets)}); first epoch: {sum(passes.values())} steps, "
            f"{spread}; {layout}; each epoch starts with its largest pass "
            f"({first_pass:,} {kind} tokens), so GPU memory is measured at its worst first")


class LengthGroupedRows(Dataset):
    """`rows` in a per-epoch order whose consecutive `step_rows` rows form one optimizer step of similar lengths.

    The order depends only on `seed + epoch` (set by accelerate's `set_epoch` before each epoch), so a resumed run
    sees the same steps. A partial last step (len % step_rows rows) stays at the end, as the Trainer expects. With a
    `shape`, the whole step holding the epoch's largest pass runs first (`grouped_order`).
    """

    def __init__(self, rows: Any, lengths: list[int], step_rows: int, seed: int,
                 shape: StepShape | None = None) -> None:
        if len(lengths) != len(rows):
            raise ValueError(f"{len(lengths)} lengths for {len(rows)} rows")
        self.rows, self.lengths, self.step_rows, self.seed, self.shape = rows, lengths, step_rows, seed, shape
        self.epoch = 0
        self.order = self.order_of(0)

    def order_of(self, epoch: int) -> list[int]:
        """The row order of `epoch`."""
        return grouped_order(self.lengths, self.step_rows, self.seed + epoch, self.shape)

    def set_epoch(self, epoch: int) -> None:
        """Reorder for `epoch` (called by the data loader before each epoch)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.order = self.order_of(epoch)

    def largest_pass(self, epochs: int) -> int:
        """Tokens of the largest pass of the first `epochs` epochs (needs a `shape`)."""
        assert self.shape is not None
        return max(self.shape.largest_pass([self.lengths[i] for i in order[s:s + self.step_rows]])
                   for order in (self.order_of(e) for e in range(epochs))
                   for s in range(0, len(order), self.step_rows))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> Any:
        return self.rows[self.order[index]]


def grouped_order(lengths: list[int], step_rows: int, seed: int, shape: StepShape | None = None) -> list[int]:
    """Row indices: shuffled, sorted (longest first) within windows of whole steps (one step when `shape` is
    packed: no grouping), steps shuffled again; with a `shape`, the first whole step holding the largest pass
    (`StepShape.largest_pass`) then moves to the front."""
    rng = random.Random(seed)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    full = len(indices) - len(indices) % step_rows
    head, tail = indices[:full], indices[full:]
    # Like transformers' LengthGroupedSampler: windows of min(50, steps/4) steps keep some randomness in which
    # rows share a step while rows within a step have close lengths. Packed steps are not grouped (a window of one
    # step): there is no padding to save, and grouping puts the longest rows together, so more steps overflow the
    # budget (the user-path data of issue 11: 6 of 38 steps in 2 passes grouped, 0-2 of 38 not).
    packed = shape is not None and shape.packed
    window = step_rows * (1 if packed else max(1, min(MAX_WINDOW_STEPS, full // step_rows // 4)))
    steps: list[list[int]] = []
    for start in range(0, full, window):
        block = sorted(head[start:start + window], key=lambda i: -lengths[i])
        steps += [block[s:s + step_rows] for s in range(0, len(block), step_rows)]
    rng.shuffle(steps)
    if shape is not None and steps:
        sizes = [shape.largest_pass([lengths[i] for i in step]) for step in steps]
        steps.insert(0, steps.pop(sizes.index(max(sizes))))
    return [i for step in steps for i in step] + sorted(tail, key=lambda i: -lengths[i])


def padding_fraction(lengths: list[int], order: list[int], step_rows: int, sequences_per_row: int = 1,
                     budget: int = 0) -> float:
    """Share of the padded tokens of the passes of `step_rows` consecutive rows of `order` (split by `chunk_rows`
    when `budget` > 0) that are padding beyond each row's own (padded) length: the padding merging adds (a pair's
    chosen/rejected mismatch is not counted)."""
    total = own = 0
    for start in range(0, len(order), step_rows):
        step = order[start:start + step_rows]
        parts = chunk_rows([lengths[i] for i in step], sequences_per_row, budget) if budget else [list(range(len(step)))]
        for part in parts:
            rows = [step[j] for j in part]
            total += len(rows) * padded(max(lengths[i] for i in rows))
            own += sum(padded(lengths[i]) for i in rows)
    return (total - own) / total if total else 0.0


# A no-grad pass keeps no activations for a backward, so it can take several times a training pass's tokens in the
# same memory (measured on the H200 box: a 65,536-token V2-Lite reference pass peaks at 15.1 GB under a 24 GB cap).
NO_GRAD_BUDGET_FACTOR = 4
# A packed pass has no padding mask to reuse: sdpa and eager attention get its block-diagonal causal mask as a
# [1, 1, N, N] tensor built from the position_ids, 65,536^2 bytes = 4.3 GB for a 4 x 16,384-token no-grad pass (and
# the scores' N x N per head for eager). Packed precompute passes stay at 16,384 real tokens (268 MB of mask),
# which hold as many real tokens as a padded pass several times their size.
PACKED_PASS_CAP = 16384


def reference_pass_budget(config: Any, engine: Any, packed: bool = False) -> int | None:
    """Token budget of the reference precompute's passes when routed experts are host-held and the user did not
    fix `precompute_ref_batch_size` (None: fixed batches in dataset order); packed passes (real tokens) at most
    `PACKED_PASS_CAP`."""
    t = config.training
    if (engine is None or not config.engine.use_kt or t.micro_batch_tokens <= 0
            or config.finetuning.precompute_ref_batch_size is not None):
        return None
    targets = expert_passes(engine.placements)
    if not (targets.get("stream") or targets.get("cpu")):
        return None
    budget = NO_GRAD_BUDGET_FACTOR * t.micro_batch_tokens
    return min(budget, PACKED_PASS_CAP) if packed else budget


def apply_micro_batching(config: Any, engine: Any, train_set: Any, collate: Any, packed: bool = False,
                         shared: bool = False) -> tuple[Any, Any, BatchPlan | None]:
    """Plan the step's passes for this run and print the line saying what was merged (or why not).

    Returns the training rows (in a `LengthGroupedRows` order when merged), the collator (a `ChunkedCollator`
    around `collate` when merged) and the plan, or the rows and collator unchanged and None when the user's batching
    stands (said in one line when the engine is on and B x G > 1). `packed`: `collate` packs its rows
    (`kllama.train.packing`), so a pass's budget counts real tokens; `shared`: it also computes each pair's prompt
    once (prefix sharing), so the budget counts the tokens computed.
    """
    t, f = config.training, config.finetuning
    rows_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if train_set is None or rows_per_step == 1 or not config.engine.use_kt:
        return train_set, collate, None
    targets = expert_passes(engine.placements) if engine is not None else Counter()
    budget = t.micro_batch_tokens
    reason = why_not_merged(use_kt=True, targets=targets, budget=budget,
                            loss_type=f.pref_loss if f.stage == "dpo" else None)
    if reason is not None:
        user = f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation"
        layout = "; each micro-batch packed (padding-free)" if packed else ""
        print(f"micro-batching: kept {user} ({reason}){layout}", flush=True)
        return train_set, collate, None
    _, sequences, unit = _STAGE_ROWS[f.stage]
    plan = BatchPlan(t.per_device_train_batch_size, t.gradient_accumulation_steps, budget, sequences, unit, packed,
                     shared)
    lengths = row_lengths(train_set, f.stage, packed, shared=plan.shared)
    # A data-parallel step gives each rank `step_rows` consecutive rows: group all ranks' rows of a step together,
    # so every step holds the same rows whatever the rank count (a resume on another count continues exactly).
    # The step of the epoch's largest pass runs first, so promotion measures the worst pass at step 1.
    shape = StepShape(plan.step_rows, sequences, budget, packed)
    train_set = LengthGroupedRows(train_set, lengths, plan.step_rows * world_size(), t.seed, shape)
    passes = passes_per_step(lengths, train_set.order, plan.step_rows, sequences, budget, packed)
    first_pass = shape.largest_pass([lengths[i] for i in train_set.order[:train_set.step_rows]])
    layout = layout_phrase(plan, lengths, train_set.order, passes)
    print(describe(plan, targets, passes, layout, first_pass), flush=True)
    return train_set, ChunkedCollator(collate, f.stage, budget, packed, plan.shared), plan
