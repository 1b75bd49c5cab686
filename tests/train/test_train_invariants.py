"""Golden invariants of the trainer: batch/accumulation equivalence and exact resume after a kill."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import GradCapture

REPO = Path(__file__).resolve().parents[2]


def first_step(model_dir: Path, tmp: Path, batch: int, accumulation: int) -> tuple[float, dict[str, torch.Tensor]]:
    from kllama.config import build_config
    from kllama.data import PairwiseCollator, build_dataset, get_template
    from kllama.model.adapters import attach_lora, resolve_lora_spec
    from kllama.model.load import load_model
    from kllama.train.run import build_training_arguments, preference_settings
    from kllama.train.trainer import KllamaTrainer
    from transformers import set_seed

    config = build_config({
        "model_name_or_path": str(model_dir), "output_dir": str(tmp / f"b{batch}a{accumulation}"), "stage": "dpo",
        "dataset": "dpo_en_demo", "template": "deepseek", "cutoff_len": 64, "max_samples": 8, "max_steps": 1,
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation, "logging_steps": 1,
        "use_kt": True, "expert_placement": "cpu", "lora_rank": 4, "seed": 3, "disable_tqdm": True,
    })
    set_seed(3)
    loaded = load_model(config, "train")
    template = get_template("deepseek", loaded.tokenizer)
    bundle = build_dataset(config.data, loaded.tokenizer, template, stage="dpo", seed=3, cache_dir=None)
    f = config.finetuning
    model = attach_lora(loaded.model, resolve_lora_spec(loaded.model, f.lora_target, f.lora_rank, None, 0.0), seed=3)
    with torch.no_grad():  # make B non-zero so every LoRA tensor has a gradient
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(len(name)))
    capture = GradCapture()
    trainer = KllamaTrainer(
        model=model, args=build_training_arguments(config, has_eval=False, use_cpu=loaded.device.type == "cpu"),
        train_dataset=bundle.train,
        data_collator=PairwiseCollator(loaded.tokenizer.pad_token_id), processing_class=loaded.tokenizer,
        callbacks=[capture], settings=preference_settings(config),
    )
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, capture.grads


def test_batch_two_equals_two_accumulated_batches_of_one(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("deepseek_v2")
    loss_a, grads_a = first_step(model_dir, tmp_path, batch=2, accumulation=1)
    loss_b, grads_b = first_step(model_dir, tmp_path, batch=1, accumulation=2)
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(".experts." in k for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def _train_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """`kllama train`'s words (after `kllama`) for the resume test's 10-step run."""
    return ["train", f"model_name_or_path={model_dir}", f"output_dir={out}",
            "stage=dpo", "dataset=dpo_en_demo", "template=deepseek", "cutoff_len=64", "max_samples=24",
            "per_device_train_batch_size=1", "max_steps=10", "save_steps=5", "logging_steps=1", "learning_rate=5e-3",
            "use_kt=true", "expert_placement=cpu", "lora_rank=4", "seed=11", "disable_tqdm=true", *extra]


def _losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    """The killed run is a real `kllama train` process; the uninterrupted reference and the resume run the same
    `main` in this process (an interpreter start and the imports less each, ~3 s on a 2-core CI machine)."""
    from kllama.cli import main

    model_dir = tiny_model_dir("deepseek_v2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    assert main(_train_args(model_dir, full)) == 0
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 11))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kllama.cli", *_train_args(model_dir, out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    deadline = time.time() + 240
    seen_step7 = False
    for line in proc.stdout:  # the Trainer logs one dict per step; kill right after step 7 is logged
        if _step_of(line) == 7:
            seen_step7 = (out / "checkpoint-5").is_dir()
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "training never reached step 7"
    proc.wait(timeout=30)
    proc.stdout.close()
    assert seen_step7 and proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint-10").exists()
    # A kill during a save leaves only staged or marker-less directories: resume must ignore both.
    (out / ".staging" / "checkpoint-8").mkdir(parents=True, exist_ok=True)
    (out / ".staging" / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"half written")
    shutil.copytree(out / "checkpoint-5", out / "checkpoint-9")
    (out / "checkpoint-9" / "trainer_state.json").unlink()
    (out / "checkpoint-9" / "adapter_model.safetensors").write_bytes(b"half written")

    capsys.readouterr()
    assert main(_train_args(model_dir, out, "resume_from_checkpoint=true")) == 0
    assert "checkpoint-5" in capsys.readouterr().out
    losses = _losses(out)
    for step in range(6, 11):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), step


def _step_of(line: str) -> int | None:
    """Which step a logged train line belongs to (the Trainer prints the loss formatted to 4 significant digits)."""
    import ast

    start = line.find("{")
    if start < 0:
        return None
    try:
        entry = ast.literal_eval(line[start:line.rfind("}") + 1])
    except (ValueError, SyntaxError):
        return None
    if "loss" not in entry:
        return None
    epoch = float(entry["epoch"])
    return round(epoch * 24)  # 24 rows, batch 1, no accumulation: one epoch = 24 steps
