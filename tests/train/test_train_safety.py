"""Runs a user can trust: a NaN stops the run, a bad rerun never destroys a finished one, write failures and
adapters of another model are one clear error (exit 2, no traceback), a dead gradient warns."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kllama.cli import main
from kllama.train.checkpoints import list_checkpoints

REPO = Path(__file__).resolve().parents[2]
COMMON = ["stage=dpo", "dataset=dpo_en_demo", "template=deepseek", "cutoff_len=64", "max_samples=8",
          "per_device_train_batch_size=2", "logging_steps=1", "disable_tqdm=true", "report_to=none", "lora_rank=4",
          "seed=3", "learning_rate=1e-3"]


def train(capsys: pytest.CaptureFixture, model_dir: Path, output_dir: Path, *extra: str) -> tuple[int, str]:
    """`kllama train` in this process: (exit status, stderr)."""
    capsys.readouterr()
    rc = main(["train", f"model_name_or_path={model_dir}", f"output_dir={output_dir}", *COMMON, *extra])
    return rc, capsys.readouterr().err


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def corrupt_copy(model_dir: Path, dest: Path, edit) -> Path:
    """A copy of a model directory whose weights `edit(state_dict)` changed."""
    shutil.copytree(model_dir, dest)
    state = load_file(str(dest / "model.safetensors"))
    edit(state)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints 1 and 2 (tests copy it before touching it)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    rc = main(["train", f"model_name_or_path={tiny_model_dir('deepseek_v2')}", f"output_dir={out}", *COMMON,
               "max_steps=2", "save_steps=1"])
    assert rc == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    return out


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


def test_nan_weight_stops_the_run_and_keeps_the_last_good_checkpoint(finished_run, tiny_model_dir, tmp_path, capsys):
    def poison(state):
        key = next(k for k in state if k.endswith("layers.0.self_attn.o_proj.weight"))
        state[key][0, 0] = float("nan")

    nan_model = corrupt_copy(tiny_model_dir("deepseek_v2"), tmp_path / "nan-model", poison)
    out = copy_run(finished_run, tmp_path)
    before = tree_digest(out / "checkpoint-2")
    rc, err = train(capsys, nan_model, out, "resume_from_checkpoint=true", "max_steps=4", "save_steps=1")
    assert rc == 2, err
    assert "Traceback" not in err
    assert "step 3" in err and "not finite" in err and ("loss" in err or "gradient norm" in err)
    assert str(out / "checkpoint-2") in err  # names the last good checkpoint
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert tree_digest(out / "checkpoint-2") == before
    for adapter in out.rglob("adapter_model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(adapter)).values()), adapter

    fresh = tmp_path / "fresh"
    rc, err = train(capsys, nan_model, fresh, "max_steps=2", "save_steps=1")
    assert rc == 2 and "step 1" in err and "no checkpoint and no adapter were written" in err
    assert not list(fresh.rglob("adapter_model.safetensors"))


def test_adapter_with_non_finite_values_is_never_written(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from kllama.errors import KllamaError
    from kllama.model.adapters import attach_lora, resolve_lora_spec, save_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("deepseek_v2"))
    peft_model = attach_lora(model, resolve_lora_spec(model, ["all"], 4, None, 0.0))
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).fill_(float("inf"))
    with pytest.raises(KllamaError, match="NaN or inf"):
        save_adapter(peft_model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_zero_gradient_norm_warns_once_naming_the_learning_rate(tiny_model_dir, tmp_path, capsys):
    # pref_beta: 0 makes every DPO gradient exactly 0 on any device (the loss is -logsigmoid(0 x margin)); a huge
    # learning rate, used before, saturated the CPU run to zero gradients but not the run on the H200 box (it failed
    # there; its numerics differ)
    rc, err = train(capsys, tiny_model_dir("deepseek_v2"), tmp_path / "out", "pref_beta=0", "learning_rate=3e-4",
                    "max_steps=13", "save_steps=100")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "grad_norm has been 0" in line]
    assert len(warnings) == 1, err
    assert "learning_rate: 0.0003" in warnings[0]


def test_overwrite_with_a_misspelled_dataset_keeps_the_finished_run(finished_run, tiny_model_dir, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = tree_digest(out)
    rc, err = train(capsys, tiny_model_dir("deepseek_v2"), out, "dataset=dpo_en_dmeo", "overwrite_output_dir=true",
                    "max_steps=2")
    assert rc == 2 and "dpo_en_dmeo" in err and "Traceback" not in err
    assert tree_digest(out) == before


def test_data_errors_come_before_the_weights_load(tiny_model_dir, tmp_path, capsys):
    # Truncated weights would fail to load; the misspelled dataset must be reported first (and alone).
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir("deepseek_v2"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc, err = train(capsys, broken, tmp_path / "out", "dataset=dpo_en_dmeo", "max_steps=1")
    assert rc == 2 and "dpo_en_dmeo" in err and "safetensors" not in err
    assert not (tmp_path / "out").exists()  # output_dir untouched


def test_overwrite_replaces_the_old_run_once_the_new_one_starts(finished_run, tiny_model_dir, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    old = tree_digest(out / "checkpoint-1")
    rc, err = train(capsys, tiny_model_dir("deepseek_v2"), out, "overwrite_output_dir=true", "max_steps=1",
                    "learning_rate=5e-3")
    assert rc == 0, err
    # the old run's checkpoints went; the new run's last step saved its own checkpoint-1
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert tree_digest(out / "checkpoint-1") != old
    assert '"global_step": 1' in (out / "trainer_state.json").read_text()


def test_adapter_of_another_hidden_size_is_one_clear_error(tiny_model_dir, tmp_path, capsys):
    from kllama.model.tiny import write_tiny_model

    wide = write_tiny_model(tmp_path / "wide", "deepseek_v2", seed=1, hidden_size=96)
    rc, err = train(capsys, wide, tmp_path / "first", "max_steps=1", "save_steps=100")
    assert rc == 0, err
    rc, err = train(capsys, tiny_model_dir("deepseek_v2"), tmp_path / "second", "max_steps=1",
                    f"adapter_name_or_path={tmp_path / 'first'}")
    assert rc == 2 and "Traceback" not in err
    assert "was not trained on this model" in err and "96" in err and "hidden_size 64" in err
    assert not (tmp_path / "second").exists()


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from kllama.cli import main
    sys.exit(main(["train", *sys.argv[2:]]))
""")


def test_disk_full_while_saving_is_one_clear_error(finished_run, tiny_model_dir, tmp_path):
    out = copy_run(finished_run, tmp_path)
    before = tree_digest(out / "checkpoint-2")
    optimizer_bytes = (out / "checkpoint-2" / "optimizer.pt").stat().st_size
    adapter_bytes = (out / "checkpoint-2" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < optimizer_bytes
    limit = (adapter_bytes + optimizer_bytes) // 2  # the adapter fits, the optimiser state does not
    args = [f"model_name_or_path={tiny_model_dir('deepseek_v2')}", f"output_dir={out}", *COMMON,
            "resume_from_checkpoint=true", "max_steps=4", "save_steps=1"]
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(limit), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "could not write" in proc.stderr and "checkpoint-3" in proc.stderr and "disk" in proc.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert tree_digest(out / "checkpoint-2") == before
    assert not (out / ".staging" / "checkpoint-3").exists()
