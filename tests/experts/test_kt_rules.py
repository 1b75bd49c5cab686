"""KTransformers `kt_optimize_rule` files: shipped examples translate to the placements they describe."""
from __future__ import annotations

from pathlib import Path

import pytest

from kllama.errors import KllamaError
from kllama.experts.kt_rules import load_kt_rules
from kllama.experts.rules import load_rule_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "kt_optimize_rules"
EXPERTS_ENTRY = """
- match:
    name: '^model\\.layers\\..*\\.mlp\\.experts$'
  replace:
    class: ktransformers.operators.experts.KTransformersExperts
    kwargs: {kwargs}
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "kt.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "name,first",
    [("DeepSeek-V2-Lite-Chat-sft-amx.yaml", 1), ("Qwen3Moe-sft-amx.yaml", 0), ("Mixtral-sft-amx.yaml", 0)],
)
def test_shipped_files_put_decode_on_cpu_and_long_passes_on_stream(name: str, first: int) -> None:
    report = load_rule_file(EXAMPLES / name)
    assert report.format == "ktransformers"
    # transformers 5 module paths, Mixtral included (KT's file says block_sparse_moe).
    names = [f"model.layers.{i}.mlp.experts" for i in range(first, 27)]
    placements = report.resolve(names, cpu_threads=64, chunk_size=8192)
    assert {(p.short, p.long, p.crossover_tokens, p.cpu_threads) for p in placements.values()} == {
        ("cpu", "stream", None, 64)}
    assert all(p.source.startswith(f"{name}#4 ") for p in placements.values())


def test_deepseek_notes_list_stock_entries_and_bf16_backend() -> None:
    notes = "\n".join(load_kt_rules(EXAMPLES / "DeepSeek-V2-Lite-Chat-sft-amx.yaml").notes)
    for needle in ("entry 0 class ktransformers.models.modeling_deepseek.DeepseekV2YarnRotaryEmbedding "
                   "(YarnRotaryEmbedding): handled by stock modules (rotary embedding)",
                   "(KTransformersLinear): handled by stock modules (linear layers)",
                   "(KDeepseekV2MoE): handled by stock modules (MoE block",
                   "(KDeepseekV2Attention): handled by stock modules (attention)",
                   "entry 6 /^model$/ (KDeepseekV2Model): handled by stock modules (model class",
                   "entry 7 /^model.embed_tokens/ (default): handled by stock modules (class default)",
                   "backend AMXBF16", "routed experts -> short=cpu long=stream"):
        assert needle in notes, needle
    qwen = "\n".join(load_kt_rules(EXAMPLES / "Qwen3Moe-sft-amx.yaml").notes)
    assert "AMXInt8: AMX int8 quantised kernel runs as bf16 torch" in qwen


@pytest.mark.parametrize(
    "kwargs,short,long",
    [
        # a CPU entry means "experts in host RAM": training passes get a measured crossover to stream
        ("{generate_device: cpu, prefill_device: cpu}", "cpu", "stream"),
        ("{generate_device: cuda, prefill_device: 'cuda:0'}", "gpu", "gpu"),
        ("{generate_device: cpu, prefill_device: cuda, prefill_op: KExpertsTorch}", "cpu", "stream"),
        ("{}", "cpu", "stream"),  # KTransformersExperts' own defaults are cpu for both
    ],
)
def test_device_translation(tmp_path: Path, kwargs: str, short: str, long: str) -> None:
    report = load_kt_rules(_write(tmp_path, EXPERTS_ENTRY.format(kwargs=kwargs)))
    p = report.resolve(["model.layers.3.mlp.experts"], cpu_threads=None, chunk_size=1024)["model.layers.3.mlp.experts"]
    assert (p.short, p.long, p.chunk_size) == (short, long, 1024)


def test_first_match_wins_and_non_expert_entries_never_decide(tmp_path: Path) -> None:
    text = """
- match: {name: '^model\\.layers\\..*$', class: torch.nn.Linear}
  replace: {class: ktransformers.operators.linear.KTransformersLinear, kwargs: {generate_device: cuda}}
- match: {name: '^model\\.layers\\.1\\.mlp\\.experts$'}
  replace:
    class: ktransformers.operators.experts.KTransformersExperts
    kwargs: {generate_device: cuda, prefill_device: cuda}
""" + EXPERTS_ENTRY.format(kwargs="{generate_device: cpu, prefill_device: cuda}")
    got = load_kt_rules(_write(tmp_path, text)).resolve(
        ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"], cpu_threads=4, chunk_size=8)
    assert got["model.layers.1.mlp.experts"].mode == "gpu" and "kt.yaml#1" in got["model.layers.1.mlp.experts"].source
    assert got["model.layers.2.mlp.experts"].mode == "auto" and "kt.yaml#2" in got["model.layers.2.mlp.experts"].source


def test_problems_name_each_entry_and_its_match(tmp_path: Path) -> None:
    text = (
        EXPERTS_ENTRY.format(kwargs="{generate_device: xpu, prefill_device: cuda}")
        + EXPERTS_ENTRY.format(kwargs="{generate_device: cpu, generate_op: KExpertsMarlin}")
        + EXPERTS_ENTRY.format(kwargs="{generate_op: KExpertsFancy}")
        + "- match: {name: '(oops'}\n  replace: {class: default}\n"
        + "- match: 'model'\n  replace: {class: default}\n  recursive: maybe\n"
    )
    with pytest.raises(KllamaError) as info:
        load_kt_rules(_write(tmp_path, text))
    msg = str(info.value)
    assert "kt.yaml" in msg and "6 problem(s)" in msg, msg
    for needle in (r"entry 0 /^model\.layers\..*\.mlp\.experts$/: generate_device 'xpu' cannot be placed",
                   "entry 1 /^model\\.layers\\..*\\.mlp\\.experts$/: generate_op KExpertsMarlin cannot run on cpu",
                   "entry 2 /^model\\.layers\\..*\\.mlp\\.experts$/: generate_op 'KExpertsFancy' is not an "
                   "experts kernel",
                   "entry 3 /(oops/: match.name '(oops' is not a valid regex",
                   "entry 4: 'match' must be a mapping"):
        assert needle in msg, needle


def test_file_for_another_model_is_an_error(tmp_path: Path) -> None:
    text = EXPERTS_ENTRY.format(kwargs="{generate_device: cpu}").replace("mlp\\.experts", "moe\\.routed")
    report = load_kt_rules(_write(tmp_path, text))
    with pytest.raises(KllamaError, match="no experts entry matching this model's routed experts"):
        report.resolve(["model.layers.1.mlp.experts"], cpu_threads=None, chunk_size=8)


def test_format_detection(tmp_path: Path) -> None:
    kt = _write(tmp_path, EXPERTS_ENTRY.format(kwargs="{}"))
    assert load_rule_file(kt).format == "ktransformers"
    own = tmp_path / "own.yaml"
    own.write_text("- {match: 'experts$', placement: gpu}\n")
    assert load_rule_file(own).format == "kllama"


def test_class_check_on_experts_entry_is_informational(tmp_path: Path) -> None:
    text = EXPERTS_ENTRY.format(kwargs="{prefill_device: cuda}").replace(
        "  replace:", "    class: ktransformers.models.modeling_deepseek.DeepseekV2MoE\n  replace:", 1)
    report = load_kt_rules(_write(tmp_path, text))
    assert any("match.class ktransformers.models.modeling_deepseek.DeepseekV2MoE is informational" in n
               for n in report.notes)
    got = report.resolve(["model.layers.4.mlp.experts"], cpu_threads=None, chunk_size=8)
    assert got["model.layers.4.mlp.experts"].mode == "auto"


LF_V2_LITE_EXPERTS = EXPERTS_ENTRY.format(
    kwargs="{generate_device: cpu, prefill_device: cpu, generate_op: KSFTExpertsCPU, prefill_op: KSFTExpertsCPU, "
           "out_device: cuda, backend: AMXInt8}")  # LLaMA-Factory's DeepSeek-V2-Lite-Chat-sft-amx.yaml entry


def test_cpu_training_entry_keeps_inference_on_cpu_and_measures_training(tmp_path: Path) -> None:
    from kllama.experts.crossover import NEVER

    report = load_kt_rules(_write(tmp_path, LF_V2_LITE_EXPERTS))
    name = "model.layers.3.mlp.experts"
    p = report.resolve([name], cpu_threads=None, chunk_size=1024)[name]
    assert (p.short, p.long, p.asked_long, p.crossover_tokens, p.infer_crossover_tokens) == (
        "cpu", "stream", "cpu", None, NEVER)
    assert p.target_for(100_000, training=False) == "cpu"  # prefill / reference passes: the CPU, as the rule says
    assert "training measured" in p.source
    notes = "\n".join(report.notes)
    assert "prefill_device cpu means the experts live in host RAM" in notes
    assert "AMX int8 quantised kernel runs as bf16 torch" in notes
    forced = report.resolve([name], cpu_threads=None, chunk_size=1024, cpu_training=True)[name]
    assert (forced.short, forced.long, forced.asked_long) == ("cpu", "cpu", None)
