"""A LLaMA-Factory-style data directory in every supported layout and file type, loaded through the registry."""
from __future__ import annotations

import json

import pytest
from data_helpers import write_json, write_jsonl

from kllama.config.sections import DataArguments
from kllama.data import IGNORE_INDEX, build_dataset, describe_example, format_summary, get_template
from kllama.errors import KllamaError

SHAREGPT_RANKING = [
    {"conversations": [{"from": "human", "value": "Hi"}],
     "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "What is 2+2?"}],
     "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "five"}},
]
ALPACA_RANKING = [
    {"instruction": "Add the numbers.", "input": "2 and 2", "chosen": "4", "rejected": "22", "system": "Be brief."},
    {"instruction": "And now?", "input": "", "chosen": "6", "rejected": "no",
     "history": [["Add 1 and 1.", "2"]]},
]
INFO = {
    "a": {"file_name": "a.json", "formatting": "sharegpt", "ranking": True,
          "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "b": {"file_name": "b.jsonl", "ranking": True,
          "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                      "system": "system", "history": "history"}},
}


def _args(**kw) -> DataArguments:
    kw.setdefault("cutoff_len", 512)
    return DataArguments(**kw)


def _decode_pair(tok, row):
    n = row["chosen_labels"].count(IGNORE_INDEX)
    return (tok.decode(row["chosen_input_ids"][:n], skip_special_tokens=False),
            tok.decode(row["chosen_input_ids"][n:], skip_special_tokens=False),
            tok.decode(row["rejected_input_ids"][n:], skip_special_tokens=False))


def test_sharegpt_and_alpaca_ranking_load_together(tmp_path, family_tokenizer):
    write_json(tmp_path / "a.json", SHAREGPT_RANKING)
    write_jsonl(tmp_path / "b.jsonl", ALPACA_RANKING)
    (tmp_path / "dataset_info.json").write_text(json.dumps(INFO))
    tok = family_tokenizer("deepseek")
    bundle = build_dataset(_args(dataset=["a", "b"], dataset_dir=str(tmp_path)), tok, get_template("deepseek", tok),
                           stage="dpo", seed=0, cache_dir=None)
    rows = [_decode_pair(tok, bundle.train[i]) for i in range(4)]
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    assert rows == [
        (f"{bos}User: Hi\n\nAssistant:", f"Hello!{eos}", f"Go away.{eos}"),
        (f"{bos}Be brief.\n\nUser: Hi\n\nAssistant:Hello!{eos}User: What is 2+2?\n\nAssistant:", f"4{eos}", f"five{eos}"),
        (f"{bos}Be brief.\n\nUser: Add the numbers.\n2 and 2\n\nAssistant:", f"4{eos}", f"22{eos}"),
        (f"{bos}User: Add 1 and 1.\n\nAssistant:2{eos}User: And now?\n\nAssistant:", f"6{eos}", f"no{eos}"),
    ]
    assert bundle.eval is None and bundle.summary.rows == 4 and bundle.summary.dropped == 0
    text = format_summary(bundle.summary)
    assert "4 train pairs" in text and "p50" in text
    example = describe_example(tok, bundle.train[0])
    assert "--- prompt (masked" in example and "Go away." in example


def test_trl_and_openai_layouts_csv_and_parquet(tmp_path, family_tokenizer):
    import datasets

    trl_rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Meh."}]},
    ]
    write_jsonl(tmp_path / "trl.jsonl", trl_rows)
    (tmp_path / "flat.csv").write_text("instruction,input,chosen,rejected\nSay hi,,Hello!,No.\n")
    datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "Hi"}], "chosen": {"role": "assistant", "content": "Hello!"},
          "rejected": {"role": "assistant", "content": "Bye."}}]
    ).to_parquet(str(tmp_path / "chat.parquet"))
    info = {"trl": {"file_name": "trl.jsonl", "formatting": "trl"},
            "csv": {"file_name": "flat.csv", "ranking": True},
            "chat": {"file_name": "chat.parquet", "formatting": "openai", "ranking": True}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    tok = family_tokenizer("qwen")
    bundle = build_dataset(_args(dataset="trl,csv,chat".split(","), dataset_dir=str(tmp_path)), tok,
                           get_template("qwen", tok, default_system="S."), stage="dpo", seed=0, cache_dir=None)
    rows = [_decode_pair(tok, bundle.train[i]) for i in range(5)]
    user = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    sys_ = "<|im_start|>system\n{}<|im_end|>\n"
    assert rows == [
        (sys_.format("S.") + user.format("Hi"), "Hello!<|im_end|>\n", "Go away.<|im_end|>\n"),
        (sys_.format("Be brief.") + user.format("Hi"), "Hello!<|im_end|>\n", "No.<|im_end|>\n"),
        (sys_.format("S.") + user.format("Hi"), "Hello!<|im_end|>\n", "Meh.<|im_end|>\n"),
        (sys_.format("S.") + user.format("Say hi"), "Hello!<|im_end|>\n", "No.<|im_end|>\n"),
        (sys_.format("S.") + user.format("Hi"), "Hello!<|im_end|>\n", "Bye.<|im_end|>\n"),
    ]


def test_sft_layouts_alpaca_sharegpt_openai(tmp_path, family_tokenizer):
    write_json(tmp_path / "alpaca.json", [{"instruction": "Say hi", "input": "", "output": "Hello!",
                                           "history": [["Hi", "Hey."]]}])
    write_json(tmp_path / "share.json", [{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}]}])
    write_jsonl(tmp_path / "oa.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]}])
    info = {"alp": {"file_name": "alpaca.json", "columns": {"history": "history"}},
            "share": {"file_name": "share.json", "formatting": "sharegpt"},
            "oa": {"file_name": "oa.jsonl", "formatting": "openai"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    tok = family_tokenizer("mistral")
    bundle = build_dataset(_args(dataset=["alp", "share", "oa"], dataset_dir=str(tmp_path)), tok,
                           get_template("mistral", tok), stage="sft", seed=0, cache_dir=None)

    def render(row):  # masked text in [..], trained text in {..}
        out, ids, labels = "", row["input_ids"], row["labels"]
        for i, lab in zip(ids, labels):
            piece = tok.decode([i], skip_special_tokens=False)
            out += piece if lab == IGNORE_INDEX else "{" + piece + "}"
        return out.replace("}{", "")

    assert [render(bundle.train[i]) for i in range(3)] == [
        "<s>[INST] Hi[/INST]{ Hey.</s>}[INST] Say hi[/INST]{ Hello!</s>}",
        "<s>[INST] Hi[/INST]{ Hello!</s>}[INST] Bye[/INST]{ See you.</s>}",
        "<s>[INST] Be brief.\n\nHi[/INST]{ Hello!</s>}",
    ]


def test_max_samples_val_size_and_eval_dataset(tmp_path, family_tokenizer):
    rows = [{"instruction": f"Question {i}", "chosen": "Sure!", "rejected": "No."} for i in range(20)]
    write_json(tmp_path / "p.json", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "p": {"file_name": "p.json", "ranking": True},
        "p5": {"file_name": "p.json", "ranking": True, "num_samples": 5},
    }))
    tok = family_tokenizer("deepseek3")
    template = get_template("deepseek3", tok)
    b = build_dataset(_args(dataset=["p"], dataset_dir=str(tmp_path), max_samples=10, val_size=0.2), tok, template,
                      stage="dpo", seed=1, cache_dir=None)
    assert (b.summary.rows, b.summary.eval_rows) == (8, 2)
    again = build_dataset(_args(dataset=["p"], dataset_dir=str(tmp_path), max_samples=10, val_size=0.2), tok, template,
                          stage="dpo", seed=1, cache_dir=None)
    assert again.eval["chosen_input_ids"] == b.eval["chosen_input_ids"]  # seeded split
    b = build_dataset(_args(dataset=["p"], eval_dataset=["p5"], dataset_dir=str(tmp_path), val_size=3), tok, template,
                      stage="dpo", seed=0, cache_dir=None)
    assert (b.summary.rows, b.summary.eval_rows) == (20, 5)
    with pytest.raises(KllamaError, match="val_size"):
        build_dataset(_args(dataset=["p"], dataset_dir=str(tmp_path), val_size=20), tok, template,
                      stage="dpo", seed=0, cache_dir=None)


def test_stage_and_registry_errors(tmp_path, family_tokenizer):
    write_json(tmp_path / "p.json", [{"instruction": "Q", "output": "A"}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "plain": {"file_name": "p.json"},
        "hub": {"hf_hub_url": "someone/prefs"},
        "missing": {"file_name": "nope.json"},
    }))
    tok = family_tokenizer("llama3")
    t = get_template("llama3", tok)
    with pytest.raises(KllamaError, match="not a preference dataset"):
        build_dataset(_args(dataset=["plain"], dataset_dir=str(tmp_path)), tok, t, stage="dpo", seed=0)
    with pytest.raises(KllamaError, match="download it first.*file_name") as err:
        build_dataset(_args(dataset=["hub"], dataset_dir=str(tmp_path)), tok, t, stage="dpo", seed=0)
    assert "someone/prefs" in str(err.value)
    with pytest.raises(KllamaError) as err:
        build_dataset(_args(dataset=["missing", "nosuch"], dataset_dir=str(tmp_path)), tok, t, stage="sft", seed=0)
    assert "nope.json" in str(err.value) and "'nosuch' is not registered" in str(err.value)
    with pytest.raises(KllamaError, match="no dataset_info.json"):
        build_dataset(_args(dataset=["x"], dataset_dir=str(tmp_path / "empty")), tok, t, stage="sft", seed=0)
