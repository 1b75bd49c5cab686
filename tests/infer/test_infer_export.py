"""`kllama export`: merged checkpoints reproduce base + adapter logits and keep the source's tensor layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from kllama.cli import main
from kllama.compat import peft_wrapped
from kllama.infer.export import checkpoint_keys, write_merged_checkpoint
from kllama.model.adapters import merge_adapters

IDS = torch.tensor([[6, 300, 41, 999, 77, 1500, 12, 640, 88, 2000, 5, 1234]])


def logits(model) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(IDS).logits


def load(path: Path):  # noqa: ANN201
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_export_cli_round_trip(moe_model: Path, moe_adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code = main(["export", f"model_name_or_path={moe_model}", f"adapter_name_or_path={moe_adapter}",
                 f"export_dir={out}", "export_size=1", "infer_dtype=float32", "template=llama3"])
    assert code == 0
    expected = logits(peft_wrapped(lambda: PeftModel.from_pretrained(load(moe_model), moe_adapter)))
    base = logits(load(moe_model))
    merged = logits(load(out))
    assert (expected - base).abs().max() > 1e-2  # the adapter (expert LoRA included) really changes the model
    assert (merged - expected).abs().max() < 1e-4
    source_keys = checkpoint_keys(moe_model)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in source_keys
    assert checkpoint_keys(out) == source_keys
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(moe_model).chat_template


def test_export_stacks_adapters_in_order(moe_model: Path, moe_adapter: Path, moe_adapter2: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged2"
    assert main(["export", f"model_name_or_path={moe_model}", f"adapter_name_or_path={moe_adapter},{moe_adapter2}",
                 f"export_dir={out}", "infer_dtype=float32"]) == 0
    first = peft_wrapped(lambda: PeftModel.from_pretrained(load(moe_model), moe_adapter)).merge_and_unload()
    # the second adapter unmerged on top
    expected = logits(peft_wrapped(lambda: PeftModel.from_pretrained(first, moe_adapter2)))
    assert (logits(load(out)) - expected).abs().max() < 1e-4


def test_sharded_export_keeps_a_fused_source_layout(tiny_model_dir, moe_adapter: Path, tmp_path: Path) -> None:  # noqa: ANN001
    fused_src = tiny_model_dir("deepseek_v2", expert_layout="fused")
    model = merge_adapters(load(fused_src), [moe_adapter])
    out = write_merged_checkpoint(model, AutoTokenizer.from_pretrained(fused_src), tmp_path / "sharded",
                                  max_shard_size="200KB", source_dir=fused_src)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == checkpoint_keys(fused_src)
    assert "model.layers.1.mlp.experts.gate_up_proj" in index["weight_map"]
    assert (logits(load(out)) - logits(model)).abs().max() < 1e-5


def test_export_refuses_to_overwrite_the_source(moe_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", f"model_name_or_path={moe_model}", f"export_dir={moe_model}"]) == 2
    assert "export_dir" in capsys.readouterr().err
