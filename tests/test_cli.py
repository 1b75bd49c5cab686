"""The `kllama` console commands that need no config: help, tiny, env."""
from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer


def kllama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kllama.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    out = kllama("--help")
    assert out.returncode == 0
    for command in ("train", "chat", "api", "export", "tiny", "env"):
        assert command in out.stdout
        assert kllama(command, "--help").returncode == 0


def test_tiny_writes_a_loadable_model(tmp_path):
    out = kllama("tiny", str(tmp_path / "m"), "--arch", "qwen3_moe", "--seed", "3")
    assert out.returncode == 0, out.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "qwen3_moe" and tokenizer.pad_token_id is not None


def test_tiny_unknown_arch_is_a_clear_error(tmp_path, capsys):
    """In this process (the test above runs `kllama tiny` as a subprocess): an uncaught error would raise here."""
    from kllama.cli import main

    assert main(["tiny", str(tmp_path / "m"), "--arch", "gpt5"]) == 2
    assert "deepseek_v2" in capsys.readouterr().err


def test_env_reports_versions():
    out = kllama("env")
    assert out.returncode == 0
    assert "torch" in out.stdout and "transformers" in out.stdout


@pytest.mark.parametrize("order", [
    ["CFG", "--print-config", "max_steps=3", "cutoff_len=7"],
    ["--print-config", "CFG", "max_steps=3", "cutoff_len=7"],
    ["CFG", "max_steps=3", "--print-config", "cutoff_len=7"],
])
def test_print_config_anywhere_on_the_line(tmp_path, capsys, order):
    from kllama.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path}\noutput_dir: {tmp_path / 'out'}\ndataset: dpo_en_demo\n")
    assert main(["train", *[str(cfg) if word == "CFG" else word for word in order]]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "max_steps: 3" in printed and "cutoff_len: 7" in printed


def test_a_stray_word_is_still_an_error(tmp_path, capsys):
    from kllama.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tmp_path / "c.yaml"), "--print-config", "max_steps=3", "--bogus"])
    assert exit_.value.code == 2 and "--bogus" in capsys.readouterr().err
