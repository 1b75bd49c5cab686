"""Helpers shared by the training tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[2]


class GradCapture(TrainerCallback):
    """Copies every trainable gradient right before the first optimiser step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops run inside it (the autograd backward included) whose first output passes `counts(func,
    output)`."""

    def __init__(self, counts) -> None:  # noqa: ANN001
        super().__init__()
        self.counts, self.count = counts, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        self.count += bool(isinstance(first, torch.Tensor) and self.counts(func, first))
        return out


def train_tiny_dpo(out: Path, model_dir: Path, *extra: str) -> str:
    """`kllama train` (a subprocess, as a user runs it) of 3 DPO steps of 4 pairs on a tiny model with experts on
    the engine; `extra` key=value overrides. Returns its stdout; the run must succeed."""
    args = [f"model_name_or_path={model_dir}", "stage=dpo", "dataset=dpo_en_demo", "template=deepseek",
            "cutoff_len=64", "max_samples=12", "per_device_train_batch_size=1", "gradient_accumulation_steps=4",
            "max_steps=3", "logging_steps=1", "learning_rate=1e-3", "use_kt=true", "expert_placement=stream",
            "lora_rank=4", "seed=5", "disable_tqdm=true", "dataloader_num_workers=0", f"output_dir={out}", *extra]
    done = subprocess.run([sys.executable, "-m", "kllama.cli", "train", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout
