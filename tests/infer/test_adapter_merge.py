"""Inference on the expert engine merges the linear layers' LoRA into their weights and keeps the routed experts'
LoRA on the engine: same logits as the stock model with the whole adapter merged, nothing of PEFT left to run."""
from __future__ import annotations

from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from kllama.config import build_config
from kllama.experts.module import HostExperts
from kllama.model.load import load_model

IDS = torch.tensor([[6, 300, 41, 999, 77, 1500, 12, 640]])


def _loaded(model_dir: Path, adapter: Path, **settings: object):  # noqa: ANN202 - LoadedModel
    config = build_config({"model_name_or_path": str(model_dir), "adapter_name_or_path": str(adapter),
                           "template": "deepseek", "infer_dtype": "float32", **settings}, command="chat")
    return load_model(config, "infer", device="cpu")


def test_engine_merges_linear_lora_and_keeps_expert_lora(moe_model: Path, moe_adapter_rank_r: Path) -> None:
    moe_adapter = moe_adapter_rank_r  # attention + routed experts (the engine's expert LoRA layout)
    engine = _loaded(moe_model, moe_adapter, infer_backend="ktransformers", use_kt=True, expert_placement="cpu")
    stock = _loaded(moe_model, moe_adapter, infer_backend="huggingface")  # the whole adapter merged by PEFT
    assert not any(isinstance(m, BaseTunerLayer) for m in engine.model.modules())
    experts = [m for m in engine.model.modules() if isinstance(m, HostExperts)]
    assert experts and all(set(m.lora.keys()) == {"gate_up_proj", "down_proj"} for m in experts)
    with torch.no_grad():
        got, want = engine.model(IDS).logits, stock.model(IDS).logits
        for m in experts:  # the expert LoRA is what makes the two agree: without it they differ
            m.lora_enabled = False
        without = engine.model(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (without - want).abs().max() > 1e-3
