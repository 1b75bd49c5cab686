"""Training curves (`plot_loss: true`): one PNG per logged metric, raw and smoothed, like LLaMA-Factory writes them.

Figures are drawn on matplotlib's Agg canvas through `matplotlib.figure.Figure` directly, never through pyplot, so
plotting needs no display, touches no global backend state and is safe from a trainer callback.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

DEFAULT_KEYS: tuple[str, ...] = ("loss", "rewards/accuracies", "rewards/margins", "eval_loss")
TRAINER_STATE_NAME = "trainer_state.json"  # what transformers' Trainer writes into each checkpoint


def smooth(values: Sequence[float]) -> list[float]:
    """TensorBoard-style EMA whose weight grows with the number of points (LLaMA-Factory's choice).

    weight = 1.8 * (sigmoid(0.05 * n) - 0.5): ~0 for a handful of points (no smoothing), ~0.9 for hundreds; the EMA
    starts at the first value.
    """
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    smoothed, last = [], values[0]
    for value in values:
        last = last * weight + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def metric_series(log_history: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The `(steps, values)` of one metric in a `TrainerState.log_history`-shaped list; entries without it skipped."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(int(entry.get("step", len(steps))))
            values.append(float(value))
    return steps, values


def plot_metric(steps: Sequence[int], values: Sequence[float], key: str, path: Path, title: str) -> Path:
    """Write one PNG with the raw curve (faint) and its smoothed curve against the training step."""
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, values, color="#1f77b4", alpha=0.35, linewidth=1.0, label="original")
    ax.plot(steps, smooth(values), color="#1f77b4", linewidth=1.8, label="smoothed")
    if len(values) == 1:  # a single point draws no line; show it
        ax.scatter(steps, values, color="#1f77b4")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, format="png")
    return path


def plot_training(
    log_history: list[dict[str, Any]],
    output_dir: str | Path,
    keys: Sequence[str] = DEFAULT_KEYS,
) -> list[Path]:
    """Write `training_<key>.png` (a `/` in the key becomes `_`) into `output_dir` for each key present in the history.

    `log_history` is transformers' `TrainerState.log_history`: dicts with `step` and the logged metrics (`loss`,
    `rewards/accuracies`, ... or `eval_loss` for evaluation entries). Keys that never appear are skipped, so
    `training_eval_loss.png` exists only when evaluation ran. Returns the paths written, in `keys` order.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        steps, values = metric_series(log_history, key)
        if not values:
            continue
        path = out / f"training_{key.replace('/', '_')}.png"
        written.append(plot_metric(steps, values, key, path, title=f"training {key} of {out.name}"))
    return written


def load_log_history(path: str | Path) -> list[dict[str, Any]]:
    """Read `log_history` from a `trainer_state.json` file, or from the one inside a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAINER_STATE_NAME
    return json.loads(path.read_text(encoding="utf-8")).get("log_history", [])
