"""Training plots: files written, real PNGs, missing keys skipped, smoothing as specified."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kllama.train.plots import load_log_history, metric_series, plot_training, smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def dpo_history(steps: int = 60, with_eval: bool = True) -> list[dict]:
    """A log_history shaped like transformers' TrainerState.log_history for a DPO run."""
    history = []
    for step in range(10, steps * 10 + 1, 10):
        history.append(
            {
                "epoch": step / 300,
                "step": step,
                "loss": 0.69 * math.exp(-step / 200) + 0.05 * math.sin(step),
                "learning_rate": 5e-6,
                "rewards/accuracies": min(1.0, 0.5 + step / 800 + 0.1 * math.cos(step)),
                "rewards/margins": step / 100 + 0.3 * math.sin(step / 7),
            }
        )
        if with_eval and step % 100 == 0:
            history.append({"epoch": step / 300, "step": step, "eval_loss": 0.7 - step / 1500})
    history.append({"epoch": 2.0, "step": steps * 10, "train_loss": 0.3, "train_runtime": 12.0})
    return history


def test_writes_all_four_pngs(tmp_path: Path) -> None:
    paths = plot_training(dpo_history(), tmp_path)
    names = [p.name for p in paths]
    assert names == [
        "training_loss.png",
        "training_rewards_accuracies.png",
        "training_rewards_margins.png",
        "training_eval_loss.png",
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_missing_keys_are_skipped(tmp_path: Path) -> None:
    history = [{k: v for k, v in e.items() if k != "rewards/margins"} for e in dpo_history(with_eval=False)]
    paths = plot_training(history, tmp_path)
    assert [p.name for p in paths] == ["training_loss.png", "training_rewards_accuracies.png"]
    assert not (tmp_path / "training_eval_loss.png").exists()
    assert not (tmp_path / "training_rewards_margins.png").exists()
    assert plot_training([], tmp_path / "empty") == []


def test_single_point_and_custom_keys(tmp_path: Path) -> None:
    paths = plot_training([{"step": 1, "grad_norm": 2.5}], tmp_path, keys=("grad_norm",))
    assert [p.name for p in paths] == ["training_grad_norm.png"]
    assert paths[0].read_bytes().startswith(PNG_MAGIC)


def test_metric_series_takes_step_and_skips_non_numbers() -> None:
    history = [{"step": 5, "loss": 1.0}, {"step": 6, "eval_loss": 2.0}, {"step": 7, "loss": None}]
    history.append({"step": 8, "loss": 3})
    assert metric_series(history, "loss") == ([5, 8], [1.0, 3.0])


def test_smooth_by_hand() -> None:
    assert smooth([]) == []
    # n = 2: weight = 1.8 * (sigmoid(0.1) - 0.5); EMA from the first value
    w = 1.8 * (1 / (1 + math.exp(-0.1)) - 0.5)
    assert smooth([1.0, 3.0]) == pytest.approx([1.0, w * 1.0 + (1 - w) * 3.0])
    # a long constant series stays constant, and a long noisy one is damped
    assert smooth([2.0] * 300) == pytest.approx([2.0] * 300)
    noisy = [(-1.0) ** i for i in range(300)]
    assert max(abs(v) for v in smooth(noisy)[50:]) < 0.2


def test_load_log_history_from_dir(tmp_path: Path) -> None:
    state = {"global_step": 3, "log_history": [{"step": 1, "loss": 1}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert load_log_history(tmp_path) == [{"step": 1, "loss": 1}]
