"""The `kllama` console commands that need no config: help, tiny, env."""
from __future__ import annotations

import subprocess
import sys

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


def test_tiny_unknown_arch_is_a_clear_error(tmp_path):
    out = kllama("tiny", str(tmp_path / "m"), "--arch", "gpt5")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "deepseek_v2" in out.stderr


def test_env_reports_versions():
    out = kllama("env")
    assert out.returncode == 0
    assert "torch" in out.stdout and "transformers" in out.stdout
