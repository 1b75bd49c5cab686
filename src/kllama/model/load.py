"""The one way every command loads a model: `load_model(config, purpose)` -> `LoadedModel`.

train, chat, api and export all come through here; what differs between them is a table of purposes (weights
dtype, device, whether the expert engine holds the routed experts, what happens to `adapter_name_or_path`).
Everything a user can get wrong about the model directory (missing files, truncated or empty safetensors, a
missing shard, remote code) is checked before any weight is read, with one KllamaError naming the file and the fix.

Two ways to build the weights sit behind it: stock `from_pretrained` on one device, or `kllama.model.meta_load`
(routed experts into pinned host RAM for the expert engine). Both use transformers' own model class whenever it
has one for the config's `model_type` (`kllama.model.source` holds that policy).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from kllama.config import KllamaConfig
from kllama.errors import KllamaError
from kllama.experts.install import ExpertEngine
from kllama.model.adapters import adapter_dirs, attach_saved_adapter, check_adapter_templates, merge_adapters
from kllama.model.checkpoint import CheckpointIndex, scan_checkpoint
from kllama.model.engine_setup import load_on_engine
from kllama.model.fused_norm import fuse_rms_norms
from kllama.model.source import ModelSource, read_model_source

Purpose = Literal["train", "infer", "export"]

# flash_attn option -> transformers' attn_implementation (None = transformers' default)
ATTN_IMPLEMENTATIONS: dict[str, str | None] = {
    "auto": None, "sdpa": "sdpa", "eager": "eager", "disabled": "eager", "fa2": "flash_attention_2",
}
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
}


@dataclass
class LoadedModel:
    """A model ready for one job: the model (with the adapters the purpose applies), its tokenizer, the device its
    inputs go to, the expert engine (None when every weight is on `device`), and the name clients see."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    engine: ExpertEngine | None
    purpose: Purpose
    source: ModelSource
    model_id: str
    adapters: tuple[Path, ...] = ()  # adapters applied to `model` (merged, or attached on the engine)

    @property
    def context_length(self) -> int:
        """Max positions of the model (prompt + answer)."""
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or self.tokenizer.model_max_length)


def compute_device() -> torch.device:
    """The current GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> `compute_device()`; anything else is a torch device string (cpu, cuda, cuda:1...)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return compute_device()
    try:
        return torch.device(name)
    except RuntimeError:
        raise KllamaError(f"device {name!r} is not a torch device; use auto, cpu or cuda[:N]") from None


def training_dtype(config: KllamaConfig) -> torch.dtype:
    """Base weights' dtype for training: bf16/fp16 when mixed precision is asked for, fp32 otherwise."""
    if config.training.bf16:
        return torch.bfloat16
    if config.training.fp16:
        return torch.float16
    return torch.float32


def _infer_dtype(config: KllamaConfig) -> torch.dtype | None:
    return DTYPES[config.model.infer_dtype]  # None: the checkpoint's own dtype


def _checkpoint_dtype(hf_config: PretrainedConfig, index: CheckpointIndex | None) -> torch.dtype:
    """What transformers' dtype="auto" picks: the config's dtype, else the first floating tensor's, else fp32."""
    dtype = getattr(hf_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    floats = [t.dtype for t in index.tensors.values() if t.dtype.is_floating_point] if index is not None else []
    return floats[0] if floats else torch.float32


def weights_dtype(config: KllamaConfig, purpose: Purpose, source: ModelSource, index: CheckpointIndex | None,
                  ) -> torch.dtype:
    """The dtype `load_model(config, purpose)` gives the weights: the purpose's choice, else the checkpoint's."""
    return PURPOSES[purpose].dtype(config) or _checkpoint_dtype(source.hf_config, index)


def served_model_id(config: KllamaConfig) -> str:
    """The model name clients see: the model directory's name (plus the last adapter's, when there is one)."""
    name = Path(config.model.model_name_or_path or "model").name
    adapters = config.model.adapter_name_or_path or []
    return f"{name}+{Path(adapters[-1]).name}" if adapters else name


# ---- what each purpose does with adapter_name_or_path -------------------------------------------------------

def _keep_for_training(model: nn.Module, adapters: list[Path], engine: ExpertEngine | None) -> nn.Module:
    return model  # `kllama train` attaches (and continues) its adapter itself


def _merge_or_attach(model: nn.Module, adapters: list[Path], engine: ExpertEngine | None) -> nn.Module:
    if engine is None:
        return merge_adapters(model, adapters)  # decoding then pays nothing for the adapters
    if not adapters:
        return model
    # On the engine the linear layers' LoRA is merged into their weights, as LLaMA-Factory merges for inference:
    # unmerged, PEFT runs ~6 small kernels per adapted linear per step (fp32 casts, two GEMVs, scale, add), which
    # more than halved V2-Lite's GPU decode (benchmarks/NOTES.md, thirteenth session). The routed experts' LoRA
    # stays on the engine (host-resident experts are not rewritten): `merge_and_unload` only touches PEFT's layers.
    return attach_saved_adapter(model, adapters[0]).merge_and_unload()


def _check_one_adapter_on_engine(adapters: list[Path], engine: bool) -> None:
    if engine and len(adapters) > 1:
        raise KllamaError(
            f"infer_backend: ktransformers takes one adapter, got {len(adapters)}; merge them first with "
            "`kllama export` (infer_backend: huggingface) and serve the merged model"
        )


@dataclass(frozen=True)
class PurposeSpec:
    """What one purpose decides: weights dtype (None = the checkpoint's), default device, whether routed experts
    go on the expert engine, what happens to the adapters, and whether the model is frozen for inference."""

    dtype: Callable[[KllamaConfig], torch.dtype | None]
    device: Callable[[KllamaConfig], str]
    on_engine: Callable[[KllamaConfig], bool]
    apply_adapters: Callable[[nn.Module, list[Path], ExpertEngine | None], nn.Module]
    frozen: bool


PURPOSES: dict[str, PurposeSpec] = {
    "train": PurposeSpec(training_dtype, lambda c: "auto", lambda c: c.engine.use_kt, _keep_for_training, False),
    "infer": PurposeSpec(_infer_dtype, lambda c: "auto", lambda c: c.generation.infer_backend == "ktransformers",
                         _merge_or_attach, True),
    # merging needs every weight in one place: export always runs stock transformers on export_device
    "export": PurposeSpec(_infer_dtype, lambda c: c.export.export_device, lambda c: False, _merge_or_attach, True),
}


def load_tokenizer(source: ModelSource, config: KllamaConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token set (the EOS when the checkpoint has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.remote_code,
                                                  use_fast=config.model.use_fast_tokenizer)
    except (OSError, ValueError) as exc:
        raise KllamaError(f"cannot load the tokenizer of {source.path}: {exc}; the directory needs the model's "
                          f"tokenizer files (tokenizer.json / tokenizer_config.json)") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fill_pad_token_id(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """The model's config and generation config take the tokenizer's pad id where they name none (most MoE
    checkpoints; kllama pads with the EOS then): otherwise transformers' Trainer rewrites them itself at the start
    of training and warns that the tokenizer's special tokens differ."""
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id


def scan_weights(path: Path) -> CheckpointIndex | None:
    """Index the safetensors (headers only): a truncated, empty or missing file fails here, before any load.
    None for a directory holding only PyTorch .bin weights, which stock transformers reads itself."""
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")) and any(path.glob("*.bin")):
        return None
    return scan_checkpoint(path)


def _load_stock(source: ModelSource, *, device: torch.device, dtype: torch.dtype,
                attn_implementation: str | None, index: CheckpointIndex | None) -> nn.Module:
    """Every weight on `device` through transformers' `from_pretrained` (its own class whenever it has one); an fp8
    checkpoint (block scales) through kllama's loader instead, which dequantizes it to `dtype` on any device."""
    if index is not None and index.scales:
        from kllama.model.meta_load import load_checkpoint

        return load_checkpoint(source, placements_fn=None, compute_device=device, dtype=dtype,
                               attn_implementation=attn_implementation)[0]
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    model = AutoModelForCausalLM.from_pretrained(source.path, config=source.hf_config, dtype=dtype,
                                                 trust_remote_code=source.remote_code, **kwargs)
    return model.to(device)


def load_model(config: KllamaConfig, purpose: Purpose, *, device: str | torch.device | None = None) -> LoadedModel:
    """Load `model_name_or_path` (+ tokenizer, + adapters as `purpose` says) for `purpose` (train | infer | export).

    `device` overrides the purpose's default ('auto' = the GPU when there is one; export: `export_device`). With
    the expert engine (train: `use_kt`; infer: `infer_backend: ktransformers`) routed experts stay in host RAM,
    placed per `kt_optimize_rule` / `expert_placement`, and the placement table is printed.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; one of {', '.join(PURPOSES)}")
    spec = PURPOSES[purpose]
    on_engine = spec.on_engine(config)
    source = read_model_source(config.model.model_name_or_path, trust_remote_code=config.model.trust_remote_code)
    adapters = adapter_dirs(config.model.adapter_name_or_path)
    if purpose != "train":
        _check_one_adapter_on_engine(adapters, on_engine)
        check_adapter_templates(config.data.template, adapters)
    attn = ATTN_IMPLEMENTATIONS[config.model.flash_attn]
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise KllamaError("flash_attn: fa2 needs the flash-attn package; pip install flash-attn, or use flash_attn: sdpa")
    index = scan_weights(source.path)
    tokenizer = load_tokenizer(source, config)
    target = resolve_device(device if device is not None else spec.device(config))
    dtype = weights_dtype(config, purpose, source, index)
    engine: ExpertEngine | None = None
    if on_engine:
        model, engine = load_on_engine(source, config, device=target, dtype=dtype, attn_implementation=attn,
                                       inference=purpose == "infer")
    else:
        model = _load_stock(source, device=target, dtype=dtype, attn_implementation=attn, index=index)
    fill_pad_token_id(model, tokenizer)
    fuse_rms_norms(model)
    if purpose == "train" and config.model.router_aux_loss_coef is not None and hasattr(model.config,
                                                                                         "router_aux_loss_coef"):
        model.config.router_aux_loss_coef = config.model.router_aux_loss_coef
    with torch.no_grad():
        model = spec.apply_adapters(model, adapters, engine)
    if spec.frozen:
        model.eval()
        model.requires_grad_(False)
    applied = tuple(adapters) if spec.apply_adapters is not _keep_for_training else ()
    return LoadedModel(model=model, tokenizer=tokenizer, device=target, engine=engine, purpose=purpose,
                       source=source, model_id=served_model_id(config), adapters=applied)
