"""`infer_backend: ktransformers`: generate with kllama's expert engine (routed experts in host RAM).

The base model comes from the shared loader (`use_kt`: experts placed per `kt_optimize_rule` / `expert_placement`;
decode runs them on the CPU, long prefills per the placement). The adapter is attached unmerged, with the expert
engine's own LoRA for routed experts, because host-resident experts are not merged in place.
"""
from __future__ import annotations

import torch

from kllama.config.loader import KllamaConfig
from kllama.errors import KllamaError
from kllama.infer.loading import LoadedModel, adapter_dirs, served_model_id
from kllama.model.load import DTYPES


def load_with_expert_engine(config: KllamaConfig, device: torch.device) -> LoadedModel:
    """Base model on the expert engine plus the (single) adapter of the config, ready for decoding."""
    from kllama.model.adapters import attach_lora, load_adapter_weights, spec_from_adapter
    from kllama.model.load import load_model

    adapters = adapter_dirs(config)
    if len(adapters) > 1:
        raise KllamaError(
            f"infer_backend: ktransformers takes one adapter, got {len(adapters)}; merge them first with "
            "`kllama export` (infer_backend: huggingface) and serve the merged model"
        )
    loaded = load_model(config, dtype=DTYPES[config.model.infer_dtype])  # None = the checkpoint's dtype
    model = loaded.model
    if adapters:
        model = attach_lora(model, spec_from_adapter(model, adapters[0]))
        load_adapter_weights(model, adapters[0])
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, loaded.tokenizer, loaded.device, served_model_id(config), extras={"engine": loaded.engine})
