"""Load the model, tokenizer and adapters for `kllama chat | api | export`, per `infer_backend`.

Backends are a table: `huggingface` is stock transformers on one device (adapters merged with peft, so decoding
pays nothing for them); `ktransformers` is kllama's expert engine (routed experts in host RAM).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from kllama.config.loader import KllamaConfig
from kllama.errors import KllamaError
from kllama.model.load import ATTN_IMPLEMENTATIONS as ATTENTION
from kllama.model.load import DTYPES, check_model_dir, compute_device, load_tokenizer

logger = logging.getLogger(__name__)


def hf_dtype(config: KllamaConfig) -> torch.dtype | str:
    """`infer_dtype` as transformers' `from_pretrained` takes it ("auto" keeps the checkpoint's dtype)."""
    return DTYPES[config.model.infer_dtype] or "auto"


@dataclass
class LoadedModel:
    """What generation needs: the model (adapters applied), its tokenizer, the device inputs go to, and a name."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    model_id: str
    extras: dict[str, Any] = field(default_factory=dict)  # backend-specific handles (e.g. the expert engine)

    @property
    def context_length(self) -> int:
        """Max positions of the model (prompt + answer)."""
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or self.tokenizer.model_max_length)


def adapter_dirs(config: KllamaConfig) -> list[Path]:
    """The adapter directories of the config, checked to be PEFT adapters."""
    out = []
    for path in config.model.adapter_name_or_path or []:
        p = Path(path)
        if not (p / "adapter_config.json").is_file():
            raise KllamaError(f"adapter_name_or_path: {path!r} holds no adapter_config.json; give the output_dir of "
                              "`kllama train` (or any PEFT adapter directory)")
        out.append(p)
    return out


def warn_template_mismatch(config: KllamaConfig, adapters: list[Path]) -> list[str]:
    """Warn (and return the warnings) when an adapter was trained with another template than the one requested."""
    warnings = []
    for adapter in adapters:
        record = adapter / "template.json"
        if not record.is_file():
            continue
        trained = json.loads(record.read_text(encoding="utf-8")).get("template")
        if trained and trained != config.data.template:
            msg = (f"adapter {str(adapter)!r} was trained with template {trained!r} but template {config.data.template!r} "
                   f"is requested; answers may degrade. Set template: {trained} to chat as it was trained")
            logger.warning(msg)
            warnings.append(msg)
    return warnings


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> the first GPU when there is one, else CPU; any other value is a torch device string."""
    if name == "auto":
        return compute_device()
    return torch.device(name)


def merge_adapters(model: PreTrainedModel, adapters: list[Path]) -> PreTrainedModel:
    """Load each PEFT adapter in order and merge it into the weights (expert LoRA on fused experts included)."""
    from peft import PeftModel

    for adapter in adapters:
        try:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except (ValueError, KeyError, RuntimeError) as exc:
            raise KllamaError(f"adapter {str(adapter)!r} does not fit model {model.config.name_or_path!r}: {exc}") from None
    return model


def _load_huggingface(config: KllamaConfig, device: torch.device) -> LoadedModel:
    model_dir = check_model_dir(config.model.model_name_or_path)
    adapters = adapter_dirs(config)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=hf_dtype(config),
        trust_remote_code=config.model.trust_remote_code,
        attn_implementation=ATTENTION[config.model.flash_attn],
    )
    model = merge_adapters(model, adapters).to(device).eval()
    return LoadedModel(model, load_tokenizer(config), device, served_model_id(config))


def _load_ktransformers(config: KllamaConfig, device: torch.device) -> LoadedModel:
    from kllama.infer.kt_backend import load_with_expert_engine

    return load_with_expert_engine(config, device)


BACKENDS: dict[str, Callable[[KllamaConfig, torch.device], LoadedModel]] = {
    "huggingface": _load_huggingface,
    "ktransformers": _load_ktransformers,
}


def served_model_id(config: KllamaConfig) -> str:
    """The model name clients see: the model directory's name (plus the last adapter's, when there is one)."""
    name = Path(config.model.model_name_or_path or "model").name
    adapters = config.model.adapter_name_or_path or []
    return f"{name}+{Path(adapters[-1]).name}" if adapters else name


def load_for_inference(config: KllamaConfig, device: str = "auto") -> LoadedModel:
    """Load model + tokenizer + adapters with the config's `infer_backend`; warn on a template mismatch."""
    warn_template_mismatch(config, adapter_dirs(config))
    return BACKENDS[config.generation.infer_backend](config, pick_device(device))
