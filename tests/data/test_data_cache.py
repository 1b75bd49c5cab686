"""The tokenized-data cache: a second identical load skips tokenization; any input change misses."""
from __future__ import annotations

import json

from data_helpers import write_json

from kllama.config.sections import DataArguments
from kllama.data import build_dataset, get_template

ROWS = [{"instruction": f"Question {i}?", "chosen": "Sure! Here you go.", "rejected": "No."} for i in range(6)]


def _build(data_dir, cache_dir, tok, template, **kw):
    args = DataArguments(dataset=["p"], dataset_dir=str(data_dir), cutoff_len=kw.pop("cutoff_len", 64), **kw)
    return build_dataset(args, tok, template, stage="dpo", seed=0, cache_dir=cache_dir)


def test_second_load_hits_the_cache(tmp_path, family_tokenizer):
    data = tmp_path / "data"
    write_json(data / "p.json", ROWS)
    (data / "dataset_info.json").write_text(json.dumps({"p": {"file_name": "p.json", "ranking": True}}))
    cache = tmp_path / "cache"
    tok = family_tokenizer("llama3")
    template = get_template("llama3", tok)

    first = _build(data, cache, tok, template)
    assert not first.summary.from_cache
    second = _build(data, cache, tok, template)
    assert second.summary.from_cache
    assert second.train.to_list() == first.train.to_list()
    assert (second.summary.rows, second.summary.lengths) == (first.summary.rows, first.summary.lengths)

    # A file edit, another cutoff, another template or overwrite_cache all rebuild.
    assert not _build(data, cache, tok, template, cutoff_len=32).summary.from_cache
    assert not _build(data, cache, tok, template, overwrite_cache=True).summary.from_cache
    assert not _build(data, cache, tok, get_template("empty", tok)).summary.from_cache
    write_json(data / "p.json", ROWS[:5])
    edited = _build(data, cache, tok, template)
    assert not edited.summary.from_cache and edited.summary.rows == 5
