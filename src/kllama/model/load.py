"""Load the base model + tokenizer a command asks for: stock transformers, or with routed experts in host RAM."""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kllama.config import KllamaConfig, parse_bytes
from kllama.config.checks import resolve_config_path
from kllama.errors import KllamaError
from kllama.experts.placement import ExpertPlacement

log = logging.getLogger(__name__)

# flash_attn option -> transformers' attn_implementation (None = transformers' default)
ATTN_IMPLEMENTATIONS: dict[str, str | None] = {
    "auto": None, "sdpa": "sdpa", "eager": "eager", "disabled": "eager", "fa2": "flash_attention_2",
}
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
}


@dataclass
class LoadedModel:
    """A model ready for a job, its tokenizer, and the expert engine when `use_kt` is on."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    engine: object | None
    device: torch.device


def compute_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def check_model_dir(path: str | None) -> Path:
    """A model path must be a local HF directory (no network here); errors say what to do."""
    if not path:
        raise KllamaError("model_name_or_path: required; set it to a Hugging Face model directory")
    p = Path(path)
    if not p.is_dir():
        raise KllamaError(
            f"model_name_or_path: {path!r} is not a directory; download the model first (e.g. `huggingface-cli download "
            f"{path} --local-dir models/{p.name}`) and point model_name_or_path at that directory, or build a tiny one "
            "with `kllama tiny DIR`"
        )
    if not (p / "config.json").is_file():
        raise KllamaError(f"model_name_or_path: {path!r} has no config.json; give a Hugging Face model directory")
    return p


def load_tokenizer(config: KllamaConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token set (the EOS when the checkpoint has none)."""
    path = check_model_dir(config.model.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=config.model.trust_remote_code, use_fast=config.model.use_fast_tokenizer
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_dtype(config: KllamaConfig) -> torch.dtype:
    """Base weights' dtype: bf16/fp16 when mixed precision is asked for, fp32 otherwise."""
    if config.training.bf16:
        return torch.bfloat16
    if config.training.fp16:
        return torch.float16
    return torch.float32


def placement_chooser(config: KllamaConfig, device: torch.device) -> Callable[[list[str]], dict[str, ExpertPlacement]]:
    """A function mapping the model's routed-expert module names to placements: from `kt_optimize_rule` when given,
    else `expert_placement`; without CUDA everything runs on the CPU; `max_gpu_memory` promotes layers to `gpu`."""
    engine = config.engine

    def choose(names: list[str]) -> dict[str, ExpertPlacement]:
        if engine.kt_optimize_rule:
            from kllama.experts.rules import load_rule_file

            path = resolve_config_path(engine.kt_optimize_rule, config)
            if path is None:
                raise KllamaError(f"kt_optimize_rule: file {engine.kt_optimize_rule!r} not found")
            placements = load_rule_file(path).resolve(
                names, cpu_threads=engine.cpu_infer, chunk_size=engine.chunk_size, default_mode=engine.expert_placement
            )
        else:
            base = ExpertPlacement.from_mode(engine.expert_placement, cpu_threads=engine.cpu_infer,
                                             chunk_size=engine.chunk_size, source="expert_placement")
            placements = {name: base for name in names}
        if device.type != "cuda":
            return {n: ExpertPlacement(short="cpu", long="cpu", cpu_threads=p.cpu_threads, chunk_size=p.chunk_size,
                                       source=f"{p.source}; no CUDA device: cpu") for n, p in placements.items()}
        return placements

    return choose


def promote_resident_layers(engine: object, budget_bytes: int, device: torch.device) -> int:
    """Keep as many layers' experts resident on the GPU as fit in `budget_bytes` minus what is already allocated
    and a reserve for activations; returns how many layers were promoted."""
    modules = list(getattr(engine, "modules").values())
    if not modules or device.type != "cuda":
        return 0
    used = torch.cuda.memory_allocated(device)
    # Activations of a 16k-token DPO micro-step with checkpointing peak at ~13 GB on V2-Lite (benchmarks/NOTES.md):
    # keep 60% of the budget for them and the two stream slots.
    reserve = max(int(0.6 * budget_bytes), 8 * 2**30)
    room = budget_bytes - used - reserve
    promoted = 0
    for module in modules:
        size = module.host_bytes()
        if room < size:
            break
        module.placement = ExpertPlacement(short="gpu", long="gpu", cpu_threads=module.placement.cpu_threads,
                                           chunk_size=module.placement.chunk_size,
                                           source=f"resident within max_gpu_memory ({module.placement.source})")
        module.resident_weights()
        room -= size
        promoted += 1
    return promoted


def _placement_table(engine: object) -> str:
    try:
        from kllama.experts.report import placement_table
    except ImportError:  # pragma: no cover - report module lands separately
        return "\n".join(f"{name}: {p.mode}" for name, p in getattr(engine, "placements").items())
    return placement_table(engine)


def load_model(config: KllamaConfig, *, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load `model_name_or_path` for a job: stock (all weights on the compute device) or, with `use_kt`, routed experts
    in (pinned) host RAM run by the expert engine; prints the placement table."""
    path = check_model_dir(config.model.model_name_or_path)
    tokenizer = load_tokenizer(config)
    device = compute_device()
    attn = ATTN_IMPLEMENTATIONS[config.model.flash_attn]
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise KllamaError("flash_attn: fa2 needs the flash-attn package; pip install flash-attn, or use flash_attn: sdpa")
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    if dtype is None:
        dtype = DTYPES[config.model.infer_dtype] or getattr(hf_config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    engine = None
    if config.engine.use_kt:
        from kllama.model.loader import load_model as load_engine_model

        model, engine = load_engine_model(
            path, placements_fn=placement_chooser(config, device), compute_device=device, dtype=dtype,
            trust_remote_code=config.model.trust_remote_code, attn_implementation=attn,
        )
        if config.engine.max_gpu_memory:
            budget = parse_bytes(config.engine.max_gpu_memory)
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / torch.cuda.get_device_properties(device).total_memory))
            promote_resident_layers(engine, budget, device)
        print(_placement_table(engine), flush=True)
    else:
        kwargs = {"attn_implementation": attn} if attn is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            path, config=hf_config, trust_remote_code=config.model.trust_remote_code, dtype=dtype, **kwargs
        ).to(device)
    if config.model.router_aux_loss_coef is not None and hasattr(model.config, "router_aux_loss_coef"):
        model.config.router_aux_loss_coef = config.model.router_aux_loss_coef
    return LoadedModel(model=model, tokenizer=tokenizer, engine=engine, device=device)
