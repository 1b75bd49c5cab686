"""What the trainer prints before training: dataset statistics and one decoded example."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kllama.data.templates import IGNORE_INDEX


@dataclass
class DataSummary:
    """Rows kept, rows dropped (invalid or left without response tokens), rows truncated, length percentiles.

    `lengths` maps p50/p90/p99/max to untruncated token counts (for pairs: prompt + the longer answer).
    """

    stage: str
    datasets: list[str]
    template: str
    cutoff_len: int
    rows: int = 0
    eval_rows: int = 0
    dropped: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    lengths: dict[str, int] = field(default_factory=dict)
    from_cache: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99/max of `values` (empty -> {})."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * p // 100) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}


def format_summary(summary: DataSummary) -> str:
    """A few aligned lines describing the data about to be trained on."""
    reasons = ", ".join(f"{n} {why}" for why, n in summary.dropped_reasons.items())
    lengths = "  ".join(f"{k} {v}" for k, v in summary.lengths.items()) or "n/a"
    unit = "pairs" if summary.stage == "dpo" else "rows"
    lines = [
        f"data      {', '.join(summary.datasets)}  (stage {summary.stage}, template {summary.template}, "
        f"cutoff_len {summary.cutoff_len}{', from cache' if summary.from_cache else ''})",
        f"rows      {summary.rows} train {unit}, {summary.eval_rows} eval {unit}",
        f"dropped   {summary.dropped}" + (f" ({reasons})" if reasons else ""),
        f"truncated {summary.truncated} (to cutoff_len {summary.cutoff_len})",
        f"tokens    {lengths}",
    ]
    return "\n".join(lines)


def _split(tokenizer, ids: list[int], labels: list[int]) -> tuple[str, str, int, int]:
    n_prompt = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    return (tokenizer.decode(ids[:n_prompt], skip_special_tokens=False),
            tokenizer.decode(ids[n_prompt:], skip_special_tokens=False), n_prompt, len(ids) - n_prompt)


def describe_example(tokenizer, row: dict) -> str:
    """One tokenized row decoded: the masked prompt, then each trained response, so the boundary is visible."""
    if "chosen_input_ids" in row:
        prompt, chosen, n_prompt, n_chosen = _split(tokenizer, row["chosen_input_ids"], row["chosen_labels"])
        _, rejected, _, n_rejected = _split(tokenizer, row["rejected_input_ids"], row["rejected_labels"])
        return (f"--- prompt (masked, {n_prompt} tokens) ---\n{prompt}\n"
                f"--- chosen (trained, {n_chosen} tokens) ---\n{chosen}\n"
                f"--- rejected (trained, {n_rejected} tokens) ---\n{rejected}")
    ids, labels = row["input_ids"], row["labels"]
    parts, start = [], 0
    # Walk maximal runs of masked / trained tokens (multi-turn SFT alternates between them).
    while start < len(ids):
        trained = labels[start] != IGNORE_INDEX
        end = start
        while end < len(ids) and (labels[end] != IGNORE_INDEX) == trained:
            end += 1
        kind = "trained" if trained else "masked"
        parts.append(f"--- {kind} ({end - start} tokens) ---\n{tokenizer.decode(ids[start:end], skip_special_tokens=False)}")
        start = end
    return "\n".join(parts)
