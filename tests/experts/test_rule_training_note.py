"""A KTransformers rule's CPU experts entry: the start-up line with both estimates, and the translation notes shown
with the placement table (CPU here with an injected measurement; the GPU behaviour in a `gpu` test)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kllama.experts.crossover import NEVER, Crossovers
from kllama.experts.install import ExpertEngine
from kllama.experts.module import HostExperts
from kllama.experts.placement import ExpertPlacement
from kllama.experts.report import placement_table, rule_training_note

# LLaMA-Factory's DeepSeek-V2-Lite-Chat-sft-amx.yaml: experts on the CPU for every pass, AMX int8 kernels.
LF_RULE = """
- match:
    class: ktransformers.models.modeling_deepseek.DeepseekV2YarnRotaryEmbedding
  replace:
    class: ktransformers.operators.RoPE.YarnRotaryEmbedding
    kwargs: {generate_device: cuda, prefill_device: cuda}
- match:
    name: '^model\\.layers\\..*\\.mlp\\.experts$'
  replace:
    class: ktransformers.operators.experts.KTransformersExperts
    kwargs:
      prefill_device: cpu
      prefill_op: KSFTExpertsCPU
      generate_device: cpu
      generate_op: KSFTExpertsCPU
      out_device: cuda
      backend: AMXInt8
  recursive: false
- match:
    name: '^model\\.layers\\..*\\.self_attn$'
  replace:
    class: ktransformers.operators.attention.KDeepseekV2Attention
    kwargs: {generate_device: cuda, prefill_device: cuda}
"""


def _engine(placement: ExpertPlacement, measured: Crossovers | None, layers: int = 2) -> ExpertEngine:
    modules = {}
    for i in range(layers):
        name = f"model.layers.{i}.mlp.experts"
        modules[name] = HostExperts(torch.zeros(4, 16, 8), torch.zeros(4, 8, 8), torch.nn.functional.silu,
                                    placement, name, compute_device="cpu")
    return ExpertEngine(modules=modules, streamer=None,
                        measurements={n: measured for n in modules} if measured is not None else {})


# one layer: a training pass costs 0.02 s per 128 tokens on the CPU (linear), and two 20 ms copies streamed
MEASURED = Crossovers(inference=40, training=256, copy_s=0.02,
                      samples={"training": [(64, 0.01), (128, 0.02), (256, 0.04)]})
ASKED_CPU = ExpertPlacement(short="cpu", long="stream", crossover_tokens=256, infer_crossover_tokens=NEVER,
                            asked_long="cpu", source="kt.yaml#1 /experts/; training measured")


def test_line_gives_both_estimates_and_says_training_streams():
    line = rule_training_note(_engine(ASKED_CPU, MEASURED), tokens=16384)
    # CPU: 2 layers x (0.04 + (16384 - 256) x 0.02 / 128) s = 5.12 s -> 3,200 tok/s; stream: 2 x 2 x 0.02 s
    assert line == ("rule asks for CPU expert training in 2 layers (est. 3,200 tok/s here, experts only, "
                    "16,384-token passes); streaming them to the GPU instead (est. 204,800 tok/s); "
                    "expert_placement: cpu forces the CPU")


def test_line_says_when_the_cpu_measured_faster():
    cpu_wins = ExpertPlacement(short="cpu", long="stream", crossover_tokens=NEVER, infer_crossover_tokens=NEVER,
                               asked_long="cpu")
    line = rule_training_note(_engine(cpu_wins, MEASURED), tokens=4096)
    assert "kept on the CPU, measured faster here" in line and "est." in line


def test_no_line_without_a_cpu_rule_or_without_a_measurement():
    assert rule_training_note(_engine(ExpertPlacement.from_mode("auto"), MEASURED), tokens=4096) is None
    assert rule_training_note(_engine(ASKED_CPU, None), tokens=4096) is None  # no CUDA: nothing was measured


def test_table_lists_notes_after_the_totals():
    table = placement_table(_engine(ASKED_CPU, None, layers=1), notes=["kt.yaml: entry 1: backend AMXInt8: ..."])
    lines = table.splitlines()
    assert lines[-2:] == ["rule file notes:", "  - kt.yaml: entry 1: backend AMXInt8: ..."]
    assert "total (1 MoE layers)" in lines[-3]


def _config(tiny_model_dir, tmp_path: Path, **extra: object):
    from kllama.config import build_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    rule = tmp_path / "DeepSeek-V2-Lite-Chat-sft-amx.yaml"
    rule.write_text(LF_RULE)
    return build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": str(tmp_path / "o"),
                         "dataset": "dpo_en_demo", "stage": "dpo", "use_kt": True, "kt_optimize_rule": str(rule),
                         **extra})


def test_start_up_summary_shows_the_rule_translation_notes(tiny_model_dir, tmp_path, capsys):
    from kllama.model.load import load_model

    load_model(_config(tiny_model_dir, tmp_path), "train")
    out = capsys.readouterr().out
    assert "rule file notes:" in out
    for needle in ("backend AMXInt8: AMX int8 quantised kernel runs as bf16 torch",
                   "(KDeepseekV2Attention): handled by stock modules (attention)",
                   "prefill_device cpu means the experts live in host RAM"):
        assert needle in out, needle


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_runs_where_measured_and_expert_placement_cpu_forces_the_cpu(tiny_model_dir, tmp_path):
    from kllama.model.load import load_model

    loaded = load_model(_config(tiny_model_dir, tmp_path), "train")
    placements = loaded.engine.placements
    assert {(p.short, p.long, p.asked_long) for p in placements.values()} == {("cpu", "stream", "cpu")}
    assert all(p.crossover_tokens not in (None, NEVER) for p in placements.values())  # measured
    assert all(p.target_for(1 << 20, training=False) == "cpu" for p in placements.values())  # no-grad: the rule
    line = rule_training_note(loaded.engine, tokens=16384)
    assert line is not None and line.count("est.") == 2 and "expert_placement: cpu forces the CPU" in line

    forced = load_model(_config(tiny_model_dir, tmp_path / "f", expert_placement="cpu"), "train")
    assert {(p.short, p.long) for p in forced.engine.placements.values()} == {("cpu", "cpu")}
    assert rule_training_note(forced.engine, tokens=16384) is None
