"""LLaMA-Factory's KTransformers keys: accepted, mapped where kllama has the meaning, named once when they do nothing;
`cpu_infer` clamped to the CPUs this process may use."""
from __future__ import annotations

import textwrap

import pytest

from kllama.config import build_config, load_config
from kllama.config.kt_keys import KT_CONFIG_KEYS, cpu_threads, engine_notices, usable_cpus
from kllama.errors import KllamaError

# LLaMA-Factory's current KTransformers LoRA SFT example (BF16) plus the INT8 keys, as a user would copy them.
LF_KT_TRAIN = textwrap.dedent("""
    model_name_or_path: /models/DeepSeek-V2-Lite
    stage: sft
    do_train: true
    finetuning_type: lora
    lora_rank: 8
    lora_alpha: 16
    lora_target: all
    dataset: alpaca_en_demo
    template: deepseek
    output_dir: /nonexistent/saves/kt
    use_kt: true
    disable_gradient_checkpointing: false
    kt_cpu_activation: retain
    kt_weight_path: /abs/path/to/routed-int8-experts
    kt_non_expert_weight_path: /abs/path/to/bf16-non-expert-cache
    kt_expert_checkpoint_path: /abs/path/to/experts
    kt_use_lora_experts: true
    kt_lora_expert_num: 2
    kt_lora_expert_intermediate_size: 256
    kt_config:
      kt_expert_weight_format: int8
      kt_backend: AMXBF16
      kt_num_threads: 1
      kt_tp_enabled: true
      kt_threadpool_count: 2
      kt_max_cache_depth: 2
      kt_weight_lifecycle: persistent
    """)


def _write(tmp_path, text: str):
    path = tmp_path / "kt.yaml"
    path.write_text(text)
    return path


def _problems(exc: pytest.ExceptionInfo) -> list[str]:
    return [line.strip()[2:] for line in str(exc.value).splitlines() if line.strip().startswith("- ")]


def test_llamafactory_kt_yaml_is_accepted_and_every_inert_key_is_named_once(tmp_path):
    config = load_config(_write(tmp_path, LF_KT_TRAIN), command="train", check_paths=False)
    assert config.engine.kt_config["kt_backend"] == "AMXBF16" and config.engine.kt_lora_expert_num == 2
    lines = engine_notices(config)
    inert = [line for line in lines if line.startswith("accepted, no effect in kllama: ")]
    named = [line.split(": ", 1)[1].split(" (")[0] for line in inert]
    assert sorted(named) == sorted([
        "kt_weight_path", "kt_non_expert_weight_path", "kt_expert_checkpoint_path", "kt_use_lora_experts",
        "kt_lora_expert_num", "kt_lora_expert_intermediate_size", "kt_cpu_activation",
        "kt_config.kt_expert_weight_format", "kt_config.kt_backend", "kt_config.kt_tp_enabled",
        "kt_config.kt_threadpool_count", "kt_config.kt_max_cache_depth", "kt_config.kt_weight_lifecycle",
    ])
    assert all(line.endswith(")") and " (" in line for line in inert)  # each says why
    # kt_num_threads is mapped, not ignored
    assert "kt_config.kt_num_threads: 1 CPU threads for expert compute (as cpu_infer)" in lines
    assert cpu_threads(config)[0] == 1


def test_mapped_and_consistent_values_say_nothing():
    config = build_config({"model_name_or_path": "m", "use_kt": True, "kt_cpu_activation": "recompute",
                           "kt_config": {"kt_expert_weight_format": "bf16"}}, command="chat", check_paths=False)
    assert engine_notices(config) == []


def test_kt_config_override_on_the_command_line_is_a_mapping():
    config = load_config(None, ["model_name_or_path=m", "use_kt=true", "kt_config={kt_num_threads: 1}"],
                         command="chat", check_paths=False)
    assert config.engine.kt_config == {"kt_num_threads": 1}


@pytest.mark.parametrize("settings,expected", [
    ({"use_kt": True, "kt_config": {"kt_num_thread": 4}}, "kt_config: unknown key(s) kt_num_thread"),
    ({"use_kt": True, "kt_config": {"kt_expert_weight_format": "int2"}}, "kt_expert_weight_format: 'int2' is not one"),
    ({"use_kt": True, "kt_config": {"kt_num_threads": 0}}, "kt_config.kt_num_threads: must be an integer >= 1"),
    ({"use_kt": True, "kt_config": "kt.yaml"}, "kt_config: expected mapping or null"),
    ({"kt_cpu_activation": "retain"}, "kt_cpu_activation: only used with use_kt: true"),
    ({"use_kt": True, "kt_cpu_activation": "recompute", "disable_gradient_checkpointing": True},
     "kt_cpu_activation: recompute needs gradient checkpointing"),
    ({"use_kt": True, "kt_cpu_activation": "sometimes"}, "kt_cpu_activation: 'sometimes' is not one of retain"),
])
def test_kt_key_problems(settings, expected):
    with pytest.raises(KllamaError) as exc:
        build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "/nonexistent/o", **settings})
    assert any(expected in p for p in _problems(exc)), _problems(exc)


def test_every_kt_config_key_of_llamafactory_is_known():
    for key in ("kt_expert_weight_format", "kt_backend", "kt_num_threads", "kt_tp_enabled", "kt_threadpool_count",
                "kt_max_cache_depth", "kt_weight_lifecycle"):
        assert key in KT_CONFIG_KEYS


@pytest.mark.parametrize("typo,suggestion", [
    ("kt_cpu_activaton", "kt_cpu_activation"),
    ("kt_optimise_rule", "kt_optimize_rule"),
    ("cpu_infr", "cpu_infer"),
    ("kt_weights_path", "kt_weight_path"),
])
def test_did_you_mean_stays_right_for_unknown_keys(typo, suggestion):
    with pytest.raises(KllamaError) as exc:
        build_config({"model_name_or_path": "m", typo: 1}, check_paths=False)
    assert f"{typo}: unknown key (did you mean {suggestion!r}?)" in _problems(exc)


def test_cpu_infer_above_the_usable_cpus_is_clamped_with_one_line():
    available = usable_cpus()
    config = build_config({"model_name_or_path": "m", "use_kt": True, "cpu_infer": available + 62},
                          command="chat", check_paths=False)
    assert config.engine.cpu_infer == available + 62  # the config keeps what the user wrote
    threads, lines = cpu_threads(config)
    assert threads == available
    assert lines == [f"cpu_infer: {available + 62} threads asked, this process may use {available} CPUs; "
                     f"using {available}"]
    within = build_config({"model_name_or_path": "m", "use_kt": True, "cpu_infer": 1}, command="chat",
                          check_paths=False)
    assert cpu_threads(within) == (1, [])


def test_placement_gets_the_clamped_threads_and_the_start_up_prints_the_lines(tiny_model_dir, tmp_path, capsys):
    from kllama.model.load import load_model

    config = build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "use_kt": True,
                           "infer_backend": "ktransformers", "cpu_infer": 4096, "kt_weight_path": "/x"},
                          command="chat")
    loaded = load_model(config, "infer")
    assert {p.cpu_threads for p in loaded.engine.placements.values()} == {usable_cpus()}
    out = capsys.readouterr().out
    assert f"cpu_infer: 4096 threads asked, this process may use {usable_cpus()} CPUs" in out
    assert "accepted, no effect in kllama: kt_weight_path (" in out
