"""Tiny random models of every supported family, written as real Hugging Face model directories.

Tests and local runs need models that load through the same code paths as the real checkpoints (config class,
checkpoint key layout, tokenizer with chat template) but are a few MB. `tiny_config` shrinks the real transformers
config of a family; `write_tiny_model` initialises it deterministically from a seed and writes config,
generation config, weights and tokenizer. Routed experts are written per expert, as hub checkpoints store them
(transformers fuses them on load), or already fused when asked.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from kllama.errors import KllamaError
from kllama.model.tokenizer import build_tokenizer

TINY_ARCHS: tuple[str, ...] = (
    "deepseek_v2",
    "deepseek_v3",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "llama",
    "qwen3",
)

EXPERT_LAYOUTS: tuple[str, ...] = ("original", "fused")

INIT_STD = 0.02

# Shared by every family: a 3-layer, 64-wide model whose position table covers our training cut-off lengths.
_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 128,  # dense MLP width (for Mixtral/OLMoE this field is the expert width, overridden below)
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "initializer_range": INIT_STD,
}

# MLA attention shrunk the way DeepSeek shapes it: a compressed kv (and q for V3) plus split rope/nope head dims.
_MLA: dict[str, Any] = {
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "first_k_dense_replace": 1,  # layer 0 dense, layers 1.. MoE, as in the real models
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
}

# Per family: what differs from _BASE. GQA (2 kv heads) where the real family uses it; OLMoE is plain MHA.
_ARCH_FIELDS: dict[str, dict[str, Any]] = {
    # V2-Lite routing: greedy top-k over softmax scores, one group, no q compression.
    "deepseek_v2": {**_MLA, "q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1},
    # V3 routing: sigmoid scores with a correction bias, best groups first (4 groups of 2 experts, keep 2).
    "deepseek_v3": {**_MLA, "q_lora_rank": 24, "n_group": 4, "topk_group": 2},
    "qwen2_moe": {
        "num_key_value_heads": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "qwen3_moe": {
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "mixtral": {
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 32,
    },
    "olmoe": {"num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32},
    "llama": {"num_key_value_heads": 2, "head_dim": 16},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 16},
}


def _check_arch(arch: str) -> None:
    if arch not in _ARCH_FIELDS:
        raise KllamaError(f"unknown tiny model arch {arch!r}; choose one of: {', '.join(TINY_ARCHS)}")


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """Return the real transformers config class of `arch`, shrunk to a tiny model; `overrides` replace fields.

    Vocabulary and bos/eos/pad ids come from `build_tokenizer(arch)`, so the config always matches the tokenizer
    `write_tiny_model` ships. Pass e.g. `hidden_size=1024, num_hidden_layers=8` to build bigger test models.
    """
    _check_arch(arch)
    tok = build_tokenizer(arch)
    fields: dict[str, Any] = {
        **_BASE,
        **_ARCH_FIELDS[arch],
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    fields.update(overrides)
    try:
        return CONFIG_MAPPING[arch](**fields)
    except (TypeError, ValueError) as exc:
        raise KllamaError(f"tiny {arch} config rejected the fields {sorted(overrides)}: {exc}") from exc


def _is_norm_weight(name: str, param: torch.Tensor) -> bool:
    return param.dim() == 1 and name.endswith("weight") and "norm" in name


@torch.no_grad()
def init_tiny_weights(model: PreTrainedModel, seed: int) -> None:
    """Deterministically re-initialise every parameter: normal(0, 0.02) matrices, unit norms, zero biases.

    We fill parameters ourselves, in name order from one seeded generator, instead of trusting each model class's
    `_init_weights`, so that the bytes depend only on (config, seed) and every tensor is well-scaled (forward
    passes stay finite, routers see distinct logits per token and route to varied experts).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if _is_norm_weight(name, param):
            param.fill_(1.0)
        elif name.endswith("bias"):  # attention biases, DeepSeek-V3's e_score_correction_bias
            param.zero_()
        elif param.dtype == torch.float32:
            param.normal_(0.0, INIT_STD, generator=gen)  # in place: one pass even for 100M-parameter test models
        else:
            param.copy_(torch.empty(param.shape).normal_(0.0, INIT_STD, generator=gen))
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # a buffer in some versions; routing starts unbiased
            buffer.zero_()


def build_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> PreTrainedModel:
    """Instantiate the tiny `arch` model in memory with seeded weights (no files); see `write_tiny_model`."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)  # anything the model class draws at construction stays seeded too
    with no_init_weights():  # we fill every parameter below; skipping the class's own init halves the time
        model = AutoModelForCausalLM.from_config(config)
    init_tiny_weights(model, seed)
    model.to(dtype)
    model.config.dtype = dtype
    model.eval()
    return model


def _write_fused_weights(model: PreTrainedModel, out_dir: Path) -> None:
    """Replace what save_pretrained wrote with the in-memory (fused experts) state dict, in one file."""
    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def write_tiny_model(
    out_dir: str | os.PathLike[str],
    arch: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    expert_layout: str = "original",
    **overrides: Any,
) -> Path:
    """Write a tiny random `arch` model as a Hugging Face directory and return its path.

    The directory holds config.json, generation_config.json, model.safetensors and the tokenizer files (with the
    family's chat template); it loads offline with `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`. The same
    seed gives byte-identical weights. `expert_layout="original"` stores routed experts one tensor per expert and
    projection, as hub checkpoints do (`mlp.experts.E.gate_proj.weight`; Mixtral
    `block_sparse_moe.experts.E.w1.weight`); `"fused"` stores transformers' in-memory layout
    (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`). Both load to the same model.
    """
    _check_arch(arch)
    if expert_layout not in EXPERT_LAYOUTS:
        raise KllamaError(f"unknown expert_layout {expert_layout!r}; choose one of: {', '.join(EXPERT_LAYOUTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(arch, seed=seed, dtype=dtype, **overrides)
    tok = build_tokenizer(arch)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    # transformers 5.x reverts its load-time conversion on save, so this already writes the per-expert hub layout.
    model.save_pretrained(out)
    if expert_layout == "fused":
        _write_fused_weights(model, out)
    # The real repos of these families keep chat_template inside tokenizer_config.json (not chat_template.jinja).
    (out / "chat_template.jinja").unlink(missing_ok=True)  # a stale one would shadow the config's template
    tok.save_pretrained(out, save_jinja_files=False)
    return out


FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _fp8_eligible(key: str, tensor: torch.Tensor) -> bool:
    # DeepSeek-V3 stores every decoder-layer linear weight in fp8 except the router; norms, embeddings and the
    # LM head stay in bf16
    return (tensor.dim() == 2 and key.endswith(".weight") and ".layers." in key and "norm" not in key
            and not key.endswith("mlp.gate.weight"))


def write_fp8_checkpoint(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Copy the model directory `src_dir` (single `model.safetensors`, e.g. from `write_tiny_model`) to `out_dir`
    in DeepSeek-V3's fp8 layout: each decoder-layer linear weight (routed experts included, the router excepted)
    becomes float8_e4m3fn with a `weight_scale_inv` of fp32 128x128 block scales, and config.json gains
    `quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}`. Other files are copied as they are."""
    import json
    import shutil

    from safetensors.torch import load_file

    from kllama.experts.quant import quantize_fp8_blocks

    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.name not in ("model.safetensors", "config.json"):
            shutil.copy2(path, out / path.name)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(src / "model.safetensors")).items():
        if _fp8_eligible(key, tensor):
            state[key], state[key + "_scale_inv"] = quantize_fp8_blocks(tensor)
        else:
            state[key] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_random_adapter(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], lora_config: Any, *,
                         seed: int = 0, std: float = 0.05, dtype: torch.dtype = torch.float32) -> Path:
    """A PEFT adapter for the checkpoint in `model_dir`, made by PEFT as `lora_config` (a `peft.LoraConfig`) says and
    saved to `out_dir`, its lora_B drawn from N(0, std) with one generator seeded `seed` (PEFT starts B at zero,
    which would make every delta zero): a trained-looking adapter for tests and benchmarks. The base is loaded in
    `dtype`."""
    from peft import get_peft_model

    from kllama.compat import peft_wrapped

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = peft_wrapped(lambda: get_peft_model(base, lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(out_dir)
    return Path(out_dir)
