"""Loading a stock PEFT adapter that names gate_proj/up_proj on a transformers-5 MoE model warns about nothing.

PEFT 0.21 converts such an adapter to the fused `gate_up_proj` with rank 2r through a `.*\\.gate_up_proj`
rank/alpha pattern, applies it, then says it ignored it (its check looks at modules only). `kllama.compat.peft_wrapped`
drops that claim when it is false and keeps it when a key really matched nothing.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from kllama.cli import main
from kllama.compat import peft_wrapped


def test_export_with_a_fused_expert_adapter_runs_under_w_error(moe_model: Path, moe_adapter: Path,
                                                               tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as `python -W error -m kllama.cli export ...`
        code = main(["export", f"model_name_or_path={moe_model}", f"adapter_name_or_path={moe_adapter}",
                     f"export_dir={tmp_path / 'merged'}", "infer_dtype=float32", "template=llama3"])
    assert code == 0


def test_the_pattern_peft_calls_ignored_is_applied(moe_model: Path, moe_adapter: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(moe_model, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = peft_wrapped(lambda: PeftModel.from_pretrained(base, moe_adapter))
    config = model.peft_config["default"]
    assert config.rank_pattern == {r".*\.gate_up_proj": 2 * config.r}
    experts = model.base_model.model.model.layers[1].mlp.experts
    num_experts = base.config.n_routed_experts
    # the fused gate+up LoRA (inner wrapper) has rank 2r per expert, down_proj (outer) rank r
    assert experts.base_layer.lora_A["default"].weight.shape[0] == num_experts * 2 * config.r
    assert experts.lora_A["default"].weight.shape[0] == num_experts * config.r


def test_a_pattern_that_matches_nothing_still_warns(moe_model: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(moe_model, dtype=torch.float32)
    config = LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"no_such_proj": 4})
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):
        peft_wrapped(lambda: get_peft_model(base, config))
