"""kllama-format expert rule files: shipped examples, first-match-wins, defaults, and all-at-once validation."""
from __future__ import annotations

from pathlib import Path

import pytest

from kllama.errors import KllamaError
from kllama.experts.rules import load_rule_file, load_rules

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "expert_rules"
NAMES = [f"model.layers.{i}.mlp.experts" for i in range(1, 5)]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rules.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["deepseek_v2_auto.yaml", "qwen3_moe_auto.yaml", "mixtral_auto.yaml"])
def test_shipped_files_give_auto_everywhere(name: str) -> None:
    rules = load_rule_file(EXAMPLES / name)
    assert rules.format == "kllama"
    placements = rules.resolve(NAMES, cpu_threads=16, chunk_size=4096)
    assert set(placements) == set(NAMES)
    for p in placements.values():
        assert (p.short, p.long, p.crossover_tokens) == ("cpu", "stream", None)
        assert p.cpu_threads == 16 and p.source.startswith(f"{name}#0")
    assert placements[NAMES[0]].chunk_size == (8192 if name == "qwen3_moe_auto.yaml" else 4096)


def test_first_match_wins_and_entry_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, r"""
default: cpu
rules:
  - match: 'layers\.2\.mlp'
    placement: gpu
  - match: 'layers\.(2|3)\.mlp'
    placement: auto
    crossover_tokens: 700
    cpu_threads: 8
    chunk_size: 256
""")
    got = load_rules(path).resolve(NAMES, cpu_threads=32, chunk_size=8192)
    assert (got[NAMES[1]].mode, got[NAMES[1]].source) == ("gpu", r"rules.yaml#0 /layers\.2\.mlp/")
    three = got[NAMES[2]]
    assert (three.short, three.long, three.crossover_tokens, three.cpu_threads, three.chunk_size) == (
        "cpu", "stream", 700, 8, 256)
    assert three.target_for(699) == "cpu" and three.target_for(700) == "stream"
    assert got[NAMES[0]].mode == "cpu" and got[NAMES[0]].source == "rules.yaml:default"
    assert got[NAMES[0]].cpu_threads == 32


def test_plain_list_falls_back_to_default_mode(tmp_path: Path) -> None:
    path = _write(tmp_path, "- {match: 'layers\\.1\\.', placement: stream}\n")
    got = load_rules(path).resolve(NAMES, cpu_threads=None, chunk_size=8192, default_mode="gpu")
    assert got[NAMES[0]].mode == "stream"
    assert [got[n].mode for n in NAMES[1:]] == ["gpu"] * 3 and got[NAMES[1]].source == "default"


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, """
default: fast
colour: blue
rules:
  - match: "layers.(1"
    placement: cpu
  - match: "ok"
    placement: everywhere
    threads: 3
  - match: "ok"
    placement: cpu
    crossover_tokens: 100
    chunk_size: "big"
  - "just a string"
""")
    with pytest.raises(KllamaError) as info:
        load_rules(path)
    msg = str(info.value)
    assert "rules.yaml" in msg and "has 8 problem(s)" in msg, msg
    for needle in ("default: placement must be one of", "unknown key 'colour'",
                   "entry 0: match 'layers.(1' is not a valid regex",
                   "entry 1: placement must be one of cpu, stream, gpu, auto, got 'everywhere'",
                   "entry 1: unknown key 'threads'", "entry 2: crossover_tokens only applies to placement auto",
                   "entry 2: chunk_size must be an integer", "entry 3: expected a mapping"):
        assert needle in msg, needle


def test_bool_is_not_an_int_and_missing_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "- {match: x, placement: cpu, cpu_threads: true}\n")
    with pytest.raises(KllamaError, match="entry 0: cpu_threads must be an integer"):
        load_rules(path)
    with pytest.raises(KllamaError, match="nope.yaml.*does not exist"):
        load_rule_file(tmp_path / "nope.yaml")
    bad = _write(tmp_path, "- {match: [unclosed\n")
    with pytest.raises(KllamaError, match="not valid YAML"):
        load_rules(bad)


def test_placement_table_rows_and_totals(tmp_path: Path) -> None:
    import torch

    from kllama.experts.module import HostExperts
    from kllama.experts.report import placement_table

    path = _write(tmp_path, "- {match: 'layers\\.1\\.', placement: gpu}\n- {match: 'experts$', placement: auto}\n")
    placements = load_rules(path).resolve(NAMES[:2], cpu_threads=4, chunk_size=64)
    modules = {
        name: HostExperts(torch.zeros(4, 16, 8), torch.zeros(4, 8, 8), torch.nn.functional.silu, placements[name],
                          name, compute_device="cpu")
        for name in NAMES[:2]
    }
    table = placement_table(modules)
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "mode", "short/long", "crossover", "host", "GPU", "resident", "source"]
    one, two = lines[2].split(), lines[3].split()
    # 4 experts x (16x8 + 8x8) fp32 = 3 KiB each; the gpu layer plans a resident copy of the same size.
    assert one[:7] == ["model.layers.1.mlp.experts", "gpu", "gpu/gpu", "-", "3.00", "KiB", "3.00"]
    assert two[:6] == ["model.layers.2.mlp.experts", "auto", "cpu/stream", "measure", "3.00", "KiB"]
    assert two[6:8] == ["0", "B"] and lines[3].endswith(r"rules.yaml#1 /experts$/")
    assert lines[-1].split()[:8] == ["total", "(2", "MoE", "layers)", "6.00", "KiB", "3.00", "KiB"]
    assert "700 tok" in placement_table(modules, {n: p.with_crossover(700) for n, p in placements.items()})


def test_placement_table_says_never_for_a_crossover_that_is_never_reached():
    from kllama.experts.crossover import NEVER
    from kllama.experts.placement import ExpertPlacement
    from kllama.experts.report import _crossover

    assert _crossover(ExpertPlacement(crossover_tokens=2, infer_crossover_tokens=NEVER)) == "infer never / train 2 tok"
    assert _crossover(ExpertPlacement(crossover_tokens=12, infer_crossover_tokens=12)) == "12 tok"
