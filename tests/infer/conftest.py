"""Fixtures of the inference tests: a tiny DeepSeek-V2 MoE model and a LoRA adapter on it (expert LoRA included)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ADAPTER_TEMPLATE = "llama3"  # recorded as the training template: differs from `deepseek` to exercise the warning


ALL_LINEAR = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(model_dir: Path, out_dir: Path, seed: int, targets: tuple[str, ...] = ALL_LINEAR) -> Path:
    """A PEFT adapter with LoRA on `targets` plus routed-expert LoRA, lora_B randomised so it changes logits.

    With gate_proj/up_proj among the targets, PEFT 0.21 gives the fused `gate_up_proj` rank 2r (its v4 -> v5 MoE
    conversion); without them, routed experts get rank r.
    """
    from peft import LoraConfig

    from kllama.model.tiny import write_random_adapter

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets),
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    write_random_adapter(model_dir, out_dir, config, seed=seed)
    (out_dir / "template.json").write_text(json.dumps({"template": ADAPTER_TEMPLATE}))
    return out_dir


@pytest.fixture(scope="session")
def moe_model(tiny_model_dir: Callable[..., Path]) -> Path:
    """Tiny DeepSeek-V2 (layer 0 dense, layers 1-2 MoE with 8 experts) in the per-expert hub key layout."""
    return tiny_model_dir("deepseek_v2")


@pytest.fixture(scope="session")
def moe_adapter(moe_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained-looking adapter directory for `moe_model`."""
    return make_adapter(moe_model, tmp_path_factory.mktemp("adapter"), seed=1)


@pytest.fixture(scope="session")
def moe_adapter2(moe_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different adapter (to stack two)."""
    return make_adapter(moe_model, tmp_path_factory.mktemp("adapter2"), seed=2)


@pytest.fixture(scope="session")
def engine(moe_model: Path, moe_adapter: Path):  # noqa: ANN201 - GenerationEngine
    """A GenerationEngine on the tiny model + adapter, fp32, template deepseek, 4 sequences decoded together."""
    from kllama.config.loader import build_config
    from kllama.infer.engine import build_engine

    config = build_config({"model_name_or_path": str(moe_model), "adapter_name_or_path": str(moe_adapter),
                           "template": "deepseek", "infer_dtype": "float32", "do_sample": False}, command="chat")
    return build_engine(config, device="cpu", max_batch=4)


@pytest.fixture(scope="session")
def moe_adapter_rank_r(moe_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter on attention + routed experts only (experts at rank r, the expert engine's LoRA layout)."""
    return make_adapter(moe_model, tmp_path_factory.mktemp("adapter_r"), seed=3, targets=("q_proj", "o_proj", "kv_b_proj"))


@pytest.fixture(scope="session")
def adapter_maker() -> Callable[..., Path]:
    """`make_adapter`, for tests that need PEFT's own adapter on another tiny model."""
    return make_adapter
