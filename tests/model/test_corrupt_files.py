"""A truncated or empty `model.safetensors`, or a shard missing from the index: every command that loads the model
stops with one error naming the file and the fix (exit 2, no traceback), before any weight is read."""
from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from kllama.cli import main


def _truncate(model_dir: Path) -> str:
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1])  # one byte short: the header still parses
    return "model.safetensors"


def _empty(model_dir: Path) -> str:
    (model_dir / "model.safetensors").write_bytes(b"")
    return "model.safetensors"


def _missing_shard(model_dir: Path) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, max_shard_size="100KB")
    victim = sorted(model_dir.glob("model-*.safetensors"))[1]
    victim.unlink()
    return victim.name


CORRUPTIONS: dict[str, Callable[[Path], str]] = {"truncated": _truncate, "empty": _empty,
                                                 "missing shard": _missing_shard}
TRAIN = ["train", "output_dir={tmp}/out", "stage=dpo", "dataset=dpo_en_demo", "template=deepseek", "max_steps=1"]
COMMANDS: dict[str, list[str]] = {
    "train": TRAIN,
    "train use_kt": [*TRAIN, "use_kt=true"],  # the expert engine reads the safetensors itself
    "chat": ["chat", "template=deepseek"],
    "chat ktransformers": ["chat", "template=deepseek", "infer_backend=ktransformers", "use_kt=true"],
    "export": ["export", "export_dir={tmp}/merged"],
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("command", COMMANDS)
def test_corrupt_weights_are_one_clear_error(command: str, corruption: str, tiny_model_dir, tmp_path: Path,  # noqa: ANN001
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("deepseek_v2"), model_dir)
    bad_file = CORRUPTIONS[corruption](model_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main([*(a.format(tmp=tmp_path) for a in COMMANDS[command]), f"model_name_or_path={model_dir}"]) == 2
    err = capsys.readouterr().err
    assert bad_file in err and "download the model again" in err, err
    assert "Traceback" not in err

