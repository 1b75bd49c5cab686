"""Tiny model factory: every family writes, loads through stock transformers, runs, and is reproducible."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kllama.errors import KllamaError
from kllama.model.tiny import TINY_ARCHS, build_tiny_model, tiny_config, write_tiny_model

MOE_ARCHS = tuple(a for a in TINY_ARCHS if a not in ("llama", "qwen3"))

# What a hub checkpoint of each family calls routed expert 0's projections in MoE layer 1.
ORIGINAL_EXPERT_KEYS = {
    "mixtral": [f"model.layers.1.block_sparse_moe.experts.0.{w}.weight" for w in ("w1", "w2", "w3")],
    **{
        arch: [f"model.layers.1.mlp.experts.0.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        for arch in MOE_ARCHS
        if arch != "mixtral"
    },
}


def _keys(model_dir) -> dict[str, tuple[int, ...]]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def _load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_each_arch_loads_and_runs(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert not any(info.values()), info  # no missing/unexpected/mismatched keys
    assert type(model.config) is type(transformers.CONFIG_MAPPING[arch]())
    assert model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings is False
    batch = tok(["Hello there, what is the capital of France?", "Rain."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits  # [B, T, V]
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert 0.01 < logits.std().item() < 10  # well-scaled, neither dead nor exploding


def test_generation_config_matches_tokenizer(tiny_model_dir):
    for arch in ("llama", "mixtral", "qwen3_moe"):
        model_dir = tiny_model_dir(arch)
        gen = json.loads((model_dir / "generation_config.json").read_text())
        tok = AutoTokenizer.from_pretrained(model_dir)
        assert gen.get("bos_token_id") == tok.bos_token_id
        assert gen["eos_token_id"] == tok.eos_token_id
        assert gen["pad_token_id"] == tok.pad_token_id is not None


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_original_layout_is_per_expert(arch, tiny_model_dir):
    keys = _keys(tiny_model_dir(arch))
    for key in ORIGINAL_EXPERT_KEYS[arch]:
        assert key in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)
    n_experts = sum(1 for k in keys if k.startswith("model.layers.1.") and ".experts." in k) // 3
    assert n_experts == 8


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_fused_layout_loads_to_the_same_model(arch, tiny_model_dir):
    fused_dir = tiny_model_dir(arch, expert_layout="fused")
    keys = _keys(fused_dir)
    assert keys["model.layers.1.mlp.experts.gate_up_proj"] == (8, 2 * 32, 64)  # [E, 2I, H]
    assert keys["model.layers.1.mlp.experts.down_proj"] == (8, 64, 32)  # [E, H, I]
    original, fused = _load(tiny_model_dir(arch)), _load(fused_dir)
    for (name, a), (_, b) in zip(original.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[5, 60, 300, 1200, 77, 901]])
    with torch.no_grad():
        torch.testing.assert_close(original(ids).logits, fused(ids).logits)


def test_deepseek_first_layer_dense_rest_moe(tiny_model_dir):
    for arch in ("deepseek_v2", "deepseek_v3"):
        keys = _keys(tiny_model_dir(arch))
        assert "model.layers.0.mlp.gate_proj.weight" in keys
        assert not any(k.startswith("model.layers.0.mlp.experts.") for k in keys)
        assert "model.layers.2.mlp.shared_experts.gate_proj.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" in _keys(tiny_model_dir("deepseek_v2"))  # no q compression
    assert "model.layers.0.self_attn.q_a_proj.weight" in _keys(tiny_model_dir("deepseek_v3"))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routers_spread_tokens_over_experts(arch, tiny_model_dir):
    model = _load(tiny_model_dir(arch))
    chosen: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]  # [T, k]
        chosen.append(top_k_index.flatten())

    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in experts]
    ids = torch.arange(20, 84).unsqueeze(0)  # 64 distinct tokens
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    assert len(chosen) == (2 if arch.startswith("deepseek") else 3)  # DeepSeek's first layer is dense
    for picks in chosen:
        assert picks.unique().numel() >= 6  # not collapsed onto a couple of experts


def test_same_seed_same_bytes_different_seed_different(tmp_path, tiny_model_dir):
    first = tiny_model_dir("mixtral", seed=0) / "model.safetensors"
    again = write_tiny_model(tmp_path / "again", "mixtral", seed=0) / "model.safetensors"
    other = write_tiny_model(tmp_path / "other", "mixtral", seed=1) / "model.safetensors"
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_dtype_and_overrides(tmp_path):
    out = write_tiny_model(tmp_path / "bf16", "qwen3_moe", dtype=torch.bfloat16, hidden_size=96, num_hidden_layers=2)
    model = _load(out)
    assert model.config.hidden_size == 96 and model.config.num_hidden_layers == 2
    assert next(model.parameters()).dtype == torch.bfloat16
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_tiny_config_shapes():
    cfg = tiny_config("deepseek_v3")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (64, 3, 8, 2)
    assert (cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim) == (32, 24, 8, 16)
    assert tiny_config("deepseek_v2").q_lora_rank is None
    assert tiny_config("mixtral", num_local_experts=4).num_local_experts == 4


def test_unknown_arch_and_layout_are_user_errors(tmp_path):
    with pytest.raises(KllamaError, match="deepseek_v2.*qwen3"):
        tiny_config("gpt2")
    with pytest.raises(KllamaError, match="choose one of"):
        write_tiny_model(tmp_path, "nope")
    with pytest.raises(KllamaError, match="fused"):
        write_tiny_model(tmp_path, "mixtral", expert_layout="packed")


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3"])
def test_skipped_class_init_leaves_no_garbage(arch):
    # build_tiny_model skips transformers' init; buffers (rotary tables, router biases) must still be the stock ones
    # and every parameter must have been filled by our seeded init.
    model = build_tiny_model(arch, seed=3)
    stock = AutoModelForCausalLM.from_config(tiny_config(arch))
    stock_buffers = dict(stock.named_buffers())
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, stock_buffers[name]), name
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        if param.dim() == 2:
            assert 0.015 < param.std().item() < 0.025, name
