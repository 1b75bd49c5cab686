"""The bundled demo data: registered, reproducible from its generator, and shaped for a tiny model to learn."""
from __future__ import annotations

import importlib.util
import json

import pytest

from kllama.config.sections import DataArguments
from kllama.data import build_dataset, bundled_data_dir, get_template


def _generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", bundled_data_dir() / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_files_match_the_generator():
    gen = _generator()
    assert (bundled_data_dir() / "dpo_en_demo.json").read_text(encoding="utf-8") == gen.render(gen.make_pairs())
    assert (bundled_data_dir() / "alpaca_en_demo.json").read_text(encoding="utf-8") == gen.render(gen.make_sft())


def test_preference_signal_is_consistent():
    gen = _generator()
    rows = json.loads((bundled_data_dir() / "dpo_en_demo.json").read_text(encoding="utf-8"))
    assert len(rows) >= 300
    assert sum("system" in r for r in rows) >= 20
    assert sum(len(r["conversations"]) > 1 for r in rows) >= 30
    prompts = {json.dumps(r["conversations"]) for r in rows}
    assert len(prompts) >= 0.9 * len(rows)  # prompts vary
    for r in rows:
        chosen, rejected = r["chosen"]["value"], r["rejected"]["value"]
        assert any(chosen.startswith(o) for o in gen.OPENERS) and any(chosen.endswith(c) for c in gen.CLOSINGS)
        assert not any(rejected.startswith(o) for o in gen.OPENERS)
        assert not any(rejected.endswith(c) for c in gen.CLOSINGS)


def test_bundled_sets_load_with_the_default_dataset_dir():
    build_tokenizer = pytest.importorskip("kllama.model.tokenizer").build_tokenizer
    tok = build_tokenizer("llama")
    template = get_template("llama3", tok)
    dpo = build_dataset(DataArguments(dataset=["dpo_en_demo"], cutoff_len=256, val_size=0.1), tok, template,
                        stage="dpo", seed=0, cache_dir=None)
    assert dpo.summary.rows + dpo.summary.eval_rows >= 300
    assert dpo.summary.truncated == 0 and dpo.summary.lengths["max"] <= 256
    sft = build_dataset(DataArguments(dataset=["alpaca_en_demo"], cutoff_len=256), tok, template,
                        stage="sft", seed=0, cache_dir=None)
    assert sft.summary.rows == 100 and sft.summary.truncated == 0
