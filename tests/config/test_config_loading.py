"""Config loading: reference YAMLs, overrides, typed parsing and all-at-once errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kllama.config import build_config, format_config, load_config
from kllama.config.parsing import CoercionError, coerce
from kllama.errors import KllamaError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TRAIN_YAML = FIXTURES / "reference_train.yaml"
INFER_YAML = FIXTURES / "reference_infer.yaml"


def _problems(exc: pytest.ExceptionInfo) -> list[str]:
    return [line.strip()[2:] for line in str(exc.value).splitlines() if line.strip().startswith("- ")]


def test_reference_train_yaml_every_key_resolved():
    config = load_config(TRAIN_YAML, command="train", check_paths=False)
    flat = config.flat()
    raw_keys = [line.split(":")[0] for line in TRAIN_YAML.read_text().splitlines() if line and not line.startswith("#")]
    for key in raw_keys:
        assert key in flat, key
        assert key in config.given, key
    assert config.finetuning.stage == "dpo"
    assert config.training.learning_rate == pytest.approx(5.0e-6)
    assert config.training.num_train_epochs == 2.0
    assert config.training.ddp_timeout == 180000000
    assert config.training.report_to == ["none"]
    assert config.data.dataset == ["dpo_en_demo"]
    assert config.engine.use_kt is True and config.engine.cpu_infer == 64 and config.engine.chunk_size == 8192
    assert config.training.resume_from_checkpoint is None
    assert config.model.trust_remote_code is True


def test_reference_infer_yaml_resolves():
    config = load_config(INFER_YAML, command="chat", check_paths=False)
    assert config.generation.infer_backend == "ktransformers"
    assert config.model.adapter_name_or_path == ["saves/Kllama_deepseekV2_DPO"]
    assert config.data.template == "deepseek"
    assert config.engine.cpu_infer == 32


@pytest.mark.parametrize("yaml_file,command", [(TRAIN_YAML, "train"), (INFER_YAML, "chat")])
def test_print_config_subprocess_shows_every_key(yaml_file, command, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kllama.cli", command, str(yaml_file), "--print-config"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    for line in yaml_file.read_text().splitlines():
        key = line.split(":")[0].strip()
        if key:
            assert f"\n{key}:" in "\n" + out.stdout, key
    assert "# default" in out.stdout  # defaults are shown and marked


def test_overrides_are_typed():
    config = load_config(TRAIN_YAML, ["learning_rate=1e-5", "max_steps=3", "resume_from_checkpoint=null",
                                      "dataset=a,b", "bf16=false", "lora_alpha=32"], check_paths=False)
    assert config.training.learning_rate == pytest.approx(1e-5)
    assert config.training.max_steps == 3
    assert config.training.resume_from_checkpoint is None
    assert config.data.dataset == ["a", "b"]
    assert config.training.bf16 is False
    assert config.finetuning.lora_alpha == 32


def test_yaml_string_exponent_is_a_float():
    # YAML 1.1 reads 1e-5 (no dot) as a string; a float field must still accept it.
    config = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "/nonexistent/x",
                           "learning_rate": "1e-5"})
    assert config.training.learning_rate == pytest.approx(1e-5)


def test_unknown_keys_reported_together_with_suggestions():
    with pytest.raises(KllamaError) as exc:
        build_config({"model_name_or_path": "m", "lerning_rate": 1, "lora_rnk": 8, "totally_new": 1}, check_paths=False)
    problems = _problems(exc)
    assert len(problems) == 3
    assert any("lerning_rate" in p and "learning_rate" in p for p in problems)
    assert any("lora_rnk" in p and "lora_rank" in p for p in problems)
    assert any("totally_new: unknown key" == p for p in problems)


def test_type_errors_name_key_type_and_value():
    with pytest.raises(KllamaError) as exc:
        build_config({"model_name_or_path": "m", "lora_rank": "eight", "bf16": "maybe", "learning_rate": [1]},
                     check_paths=False)
    problems = _problems(exc)
    assert "lora_rank: expected int, got 'eight'" in problems
    assert "bf16: expected bool, got 'maybe'" in problems
    assert any(p.startswith("learning_rate: expected float") for p in problems)


def test_choices_are_checked():
    with pytest.raises(KllamaError, match="pref_loss: 'dpo_magic' is not one of"):
        build_config({"model_name_or_path": "m", "stage": "dpo", "pref_loss": "dpo_magic"}, check_paths=False)


def test_unsupported_keys_say_not_supported_yet():
    with pytest.raises(KllamaError) as exc:
        build_config({"model_name_or_path": "m", "quantization_bit": 4, "deepspeed": "ds.json"}, check_paths=False)
    problems = _problems(exc)
    assert all("not supported yet" in p for p in problems) and len(problems) == 2


def test_aliases_map_to_kllama_keys():
    config = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "/nonexistent/x",
                           "moe_aux_loss_coef": 0.01, "disable_gradient_checkpointing": True})
    assert config.model.router_aux_loss_coef == pytest.approx(0.01)
    assert config.training.gradient_checkpointing is False


def _train(**kw):
    base = {"model_name_or_path": "m", "dataset": "d", "output_dir": "/nonexistent/out"}
    base.update(kw)
    return build_config(base, command="train")


@pytest.mark.parametrize("settings,expected", [
    ({"pref_loss": "orpo"}, "pref_loss: only used with stage: dpo"),
    ({"stage": "dpo", "pref_loss": "hinge", "dpo_label_smoothing": 0.1}, "dpo_label_smoothing: only used with pref_loss sigmoid"),
    ({"stage": "dpo", "simpo_gamma": 1.0}, "simpo_gamma: only used with pref_loss: simpo"),
    ({"bf16": True, "fp16": True}, "bf16 and fp16"),
    ({"warmup_ratio": 1.5}, "warmup_ratio: must be in [0, 1)"),
    ({"do_eval": True}, "do_eval: needs val_size"),
    ({"kt_optimize_rule": "rules.yaml"}, "kt_optimize_rule: only used with use_kt: true"),
    ({"use_kt": True, "kt_optimize_rule": "no/such/rules.yaml"}, "kt_optimize_rule: file 'no/such/rules.yaml' not found"),
    ({"create_new_adapter": True}, "create_new_adapter: needs adapter_name_or_path"),
    ({"report_to": "none,tensorboard"}, "report_to: 'none' cannot be combined"),
    ({"resume_from_checkpoint": "/no/such/checkpoint-5"}, "resume_from_checkpoint: '/no/such/checkpoint-5' is not a directory"),
    ({"stage": "dpo", "pref_loss": "simpo", "precompute_ref_log_probs": True}, "uses no reference model"),
    ({"stage": "dpo", "precompute_ref_batch_size": 8}, "precompute_ref_batch_size: only used with precompute_ref_log_probs"),
    ({"stage": "dpo", "precompute_ref_log_probs": True, "precompute_ref_batch_size": 0}, "precompute_ref_batch_size: must be >= 1"),
    ({"max_gpu_memory": "lots"}, "max_gpu_memory: 'lots' is not a size"),
    ({"val_size": 2.5}, "val_size: a count must be a whole number"),
])
def test_cross_field_checks(settings, expected):
    with pytest.raises(KllamaError) as exc:
        _train(**settings)
    assert any(expected in p for p in _problems(exc)), _problems(exc)


def test_existing_output_dir_needs_overwrite_or_resume(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(KllamaError, match="already exists and is not empty"):
        _train(output_dir=str(tmp_path))
    assert _train(output_dir=str(tmp_path), overwrite_output_dir=True).training.overwrite_output_dir
    assert _train(output_dir=str(tmp_path), resume_from_checkpoint=True).training.resume_from_checkpoint is True


def test_infer_checks():
    with pytest.raises(KllamaError, match="infer_backend: ktransformers runs kllama's expert engine"):
        build_config({"model_name_or_path": "m", "infer_backend": "ktransformers"}, command="chat")
    with pytest.raises(KllamaError, match="export_dir: required"):
        build_config({"model_name_or_path": "m"}, command="export")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(KllamaError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(KllamaError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(KllamaError, match="must hold a mapping"):
        load_config(listy)
    with pytest.raises(KllamaError, match="not of the form key=value"):
        load_config(None, ["learning_rate"])


def test_cli_reports_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kllama.cli", "train", str(TRAIN_YAML), "lerning_rate=1", "foo=2"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "2 problem(s)" in out.stderr and "did you mean 'learning_rate'" in out.stderr


@pytest.mark.parametrize("value,tp,expected", [
    ("5.0e-6", float, 5e-6), ("null", int | None, None), ("true", bool, True), ("a, b", list[str], ["a", "b"]),
    ("3", int, 3), ("1e3", int, 1000), (2, float, 2.0),
])
def test_coerce(value, tp, expected):
    assert coerce(value, tp) == expected


@pytest.mark.parametrize("value,tp", [("x", int), (True, int), ("2.5", int), (None, int), ("nope", bool)])
def test_coerce_rejects(value, tp):
    with pytest.raises(CoercionError):
        coerce(value, tp)


def test_format_config_marks_defaults():
    text = format_config(load_config(INFER_YAML, command="chat", check_paths=False))
    assert "temperature: 0.95  # default" in text
    assert "infer_backend: ktransformers\n" in text
