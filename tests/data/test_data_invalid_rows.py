"""Bad rows: an error naming file, row and problem (at most 10 listed), or dropped and counted when skipped."""
from __future__ import annotations

import json

import pytest
from data_helpers import write_json, write_jsonl

from kllama.config.sections import DataArguments
from kllama.data import build_dataset, get_template
from kllama.errors import KllamaError

GOOD = {"conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "No."}}


def _bad(**changes) -> dict:
    row = json.loads(json.dumps(GOOD))
    row.update(changes)
    return row


# (bad row, the words the error must contain)
BAD_ROWS = [
    (_bad(chosen=None), "chosen is missing or empty"),
    (_bad(rejected={"from": "gpt", "value": ""}), "rejected is missing or empty"),
    (_bad(conversations=[{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi again"},
                         {"from": "human", "value": "?"}]), "roles must alternate"),
    (_bad(conversations=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes?"}]), "must end with a user turn"),
    (_bad(chosen=42), "chosen must be a message object or a string, got int"),
    (_bad(conversations="Hi"), "must be a list of messages, got str"),
    (_bad(conversations=[{"from": "robot", "value": "Hi"}]), "has role 'robot'"),
    (_bad(rejected={"from": "human", "value": "No."}), "rejected must be an assistant message"),
]


def _setup(tmp_path, rows, *, jsonl=False, columns=None):
    (write_jsonl if jsonl else write_json)(tmp_path / ("d.jsonl" if jsonl else "d.json"), rows)
    entry = {"file_name": "d.jsonl" if jsonl else "d.json", "formatting": "sharegpt", "ranking": True}
    if columns:
        entry["columns"] = columns
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": entry}))


def _build(tmp_path, tok, skip=False):
    args = DataArguments(dataset=["d"], dataset_dir=str(tmp_path), cutoff_len=128, skip_invalid_rows=skip)
    return build_dataset(args, tok, get_template("llama3", tok), stage="dpo", seed=0, cache_dir=None)


@pytest.mark.parametrize("row, words", BAD_ROWS, ids=[w.split()[0] + str(i) for i, (_, w) in enumerate(BAD_ROWS)])
def test_each_kind_of_bad_row_is_named(tmp_path, family_tokenizer, row, words):
    _setup(tmp_path, [GOOD, GOOD, row, GOOD])
    tok = family_tokenizer("llama3")
    with pytest.raises(KllamaError) as err:
        _build(tmp_path, tok)
    msg = str(err.value)
    assert f"{tmp_path / 'd.json'}, row 2: " in msg and words in msg and "skip_invalid_rows" in msg
    bundle = _build(tmp_path, tok, skip=True)
    assert bundle.summary.rows == 3 and bundle.summary.dropped == 1


def test_broken_json_line_is_named_and_skippable(tmp_path, family_tokenizer):
    _setup(tmp_path, [GOOD, '{"conversations": [broken', GOOD], jsonl=True)
    tok = family_tokenizer("llama3")
    with pytest.raises(KllamaError, match=r"d\.jsonl, line 2: broken JSON"):
        _build(tmp_path, tok)
    bundle = _build(tmp_path, tok, skip=True)
    assert bundle.summary.rows == 2 and bundle.summary.dropped == 1


def test_column_named_in_columns_but_absent(tmp_path, family_tokenizer):
    _setup(tmp_path, [GOOD], columns={"messages": "conversations", "chosen": "better", "rejected": "rejected"})
    with pytest.raises(KllamaError, match="column 'better' \\(chosen\\) is named by dataset 'd' but absent"):
        _build(tmp_path, family_tokenizer("llama3"), skip=True)  # not a row problem: skipping cannot help


def test_at_most_ten_rows_are_listed(tmp_path, family_tokenizer):
    _setup(tmp_path, [_bad(chosen="")] * 13 + [GOOD])
    with pytest.raises(KllamaError) as err:
        _build(tmp_path, family_tokenizer("llama3"))
    msg = str(err.value)
    assert msg.startswith("13 invalid row(s)") and "row 9:" in msg and "row 10:" not in msg
    assert "... and 3 more" in msg


def test_all_rows_invalid_and_skipped(tmp_path, family_tokenizer):
    _setup(tmp_path, [_bad(chosen="")] * 2)
    with pytest.raises(KllamaError, match="no usable rows"):
        _build(tmp_path, family_tokenizer("llama3"), skip=True)


LATIN1_ROW = {"instruction": "Caf\u00e9?", "chosen": "Oui.", "rejected": "Non."}


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv"])
@pytest.mark.parametrize("skip", [False, True])
def test_a_file_that_is_not_utf8_is_one_clear_error(tmp_path, family_tokenizer, suffix, skip):
    rows = [{"instruction": "Hi", "chosen": "Hello!", "rejected": "No."}, LATIN1_ROW]
    texts = {"json": json.dumps(rows, ensure_ascii=False, indent=1),
             "jsonl": "\n".join(json.dumps(r, ensure_ascii=False) for r in rows),
             "csv": "instruction,chosen,rejected\nHi,Hello!,No.\nCaf\u00e9?,Oui.,Non.\n"}
    (tmp_path / f"d.{suffix}").write_bytes(texts[suffix].encode("latin-1"))  # 0xe9 alone is not UTF-8
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": f"d.{suffix}", "ranking": True}}))
    with pytest.raises(KllamaError) as err:
        _build(tmp_path, family_tokenizer("llama3"), skip=skip)
    msg = str(err.value)
    assert f"{tmp_path / f'd.{suffix}'} is not UTF-8" in msg and "b'\\xe9'" in msg and "iconv" in msg
    assert f"line {texts[suffix].split(chr(0xe9))[0].count(chr(10)) + 1}," in msg
