"""`lora_target: all` on MoE models: attention, dense-MLP and shared-expert linears and the routed experts all get
LoRA, and the saved adapter loads with stock `PeftModel.from_pretrained` on the stock transformers model."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kllama.compat import peft_wrapping
from kllama.errors import KllamaError
from kllama.model.adapters import attach_lora, resolve_lora_spec, save_adapter, spec_from_adapter

# arch -> linear modules (by qualified-name suffix) that must get LoRA besides attention
DENSE_AND_SHARED = {
    "deepseek_v2": ("layers.0.mlp.gate_proj", "layers.0.mlp.down_proj", "layers.1.mlp.shared_experts.up_proj"),
    "qwen2_moe": ("layers.0.mlp.shared_expert.gate_proj", "layers.1.mlp.shared_expert.down_proj"),
}


@pytest.mark.parametrize("arch", sorted(DENSE_AND_SHARED))
def test_all_covers_dense_and_shared_linears_and_loads_on_stock_peft(arch, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    spec = resolve_lora_spec(model, ["all"], 4, None, 0.0)
    peft_model = attach_lora(model, spec, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero lora_B everywhere, so every LoRA changes the output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    lora_modules = {n.split(".lora_A")[0].replace(".base_layer", "") for n, _ in peft_model.named_parameters()
                    if ".lora_A" in n}
    for suffix in DENSE_AND_SHARED[arch]:
        assert any(m.endswith(suffix) for m in lora_modules), f"{suffix} got no LoRA"
    assert any(m.endswith("mlp.experts") for m in lora_modules), "routed experts got no LoRA"
    save_adapter(peft_model, tmp_path / "adapter")
    assert spec_from_adapter(model, tmp_path / "adapter") == spec

    ids = torch.randint(5, 300, (2, 12), generator=gen)
    with torch.no_grad():
        ours = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        with peft_wrapping():
            stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                              tmp_path / "adapter")
        theirs = stock(input_ids=ids).logits
        stock_lora = {n for n, _ in stock.named_parameters() if "lora_" in n}
        # stock PEFT built a LoRA for every tensor of the adapter (none dropped or renamed to the routed experts)
        assert len(stock_lora) == sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_dense_lora_needs_no_dropout(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("deepseek_v2"))
    with pytest.raises(KllamaError, match="lora_dropout"):
        resolve_lora_spec(model, ["all"], 4, None, 0.1)
    assert resolve_lora_spec(model, ["q_proj"], 4, None, 0.1).linear_weights == ()  # plain linear LoRA keeps dropout
