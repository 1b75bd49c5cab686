"""A tiny `kllama train` (expert engine, evaluation, checkpoints, plots) under `-W error` for FutureWarning and
DeprecationWarning, every other warning shown: a deprecated name anywhere on the path fails this test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_runs_without_any_warning(tiny_model_dir, tmp_path):
    flags = ["-W", "default", "-W", "error::FutureWarning", "-W", "error::DeprecationWarning"]  # later flags win
    args = [f"model_name_or_path={tiny_model_dir('deepseek_v2')}", f"output_dir={tmp_path / 'out'}", "stage=dpo",
            "dataset=dpo_en_demo", "template=deepseek", "cutoff_len=64", "max_samples=10", "val_size=2",
            "per_device_train_batch_size=2", "logging_steps=1", "max_steps=2", "save_steps=1", "use_kt=true",
            "expert_placement=cpu", "plot_loss=true", "disable_tqdm=true", "lora_rank=4"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": ""}
    out = subprocess.run([sys.executable, *flags, "-m", "kllama.cli", "train", *args], capture_output=True,
                         text=True, timeout=300, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Warning" not in out.stderr and "warning" not in out.stdout.lower(), out.stderr[-4000:]
