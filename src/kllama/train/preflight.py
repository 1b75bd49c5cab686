"""Everything `kllama train` can check before it touches `output_dir` or reads a weight.

On a 236B model the weights take many minutes to load; a misspelled dataset, a broken data file, a template the
tokenizer cannot render or an adapter trained on another model must fail before that, and before an old run in
`output_dir` is replaced. `prepare_inputs` reads the model's config, checks the starting adapters against it, builds
the tokenizer, the template and the tokenized dataset and indexes the weight files; what it returns is used by the
run as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from kllama.config import KllamaConfig
from kllama.errors import KllamaError

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_PEFT_PREFIX = "base_model.model."


@dataclass
class PreparedInputs:
    """What the run needs besides the weights, all validated: tokenizer, template, datasets, the model's config."""

    tokenizer: PreTrainedTokenizerBase
    template: Any  # kllama.data.Template
    bundle: Any  # kllama.data.DatasetBundle
    hf_config: PretrainedConfig
    cache_dir: str


def prepare_inputs(config: KllamaConfig) -> PreparedInputs:
    """Check the model directory and read its config, check the starting adapters against it, build tokenizer +
    template + tokenized datasets, then index the weight files (headers only: a truncated or missing file fails
    here); any problem raises a KllamaError before output_dir or a weight is touched."""
    from kllama.data import build_dataset, get_template
    from kllama.model.checkpoint import scan_checkpoint
    from kllama.model.load import load_tokenizer
    from kllama.model.source import read_model_source

    source = read_model_source(config.model.model_name_or_path, trust_remote_code=config.model.trust_remote_code)
    for adapter in config.model.adapter_name_or_path or []:
        check_adapter_fits(adapter, source.hf_config, source.path)
    tokenizer = load_tokenizer(source, config)
    template = get_template(config.data.template, tokenizer)
    cache_dir = config.model.cache_dir or str(Path.home() / ".cache" / "kllama")
    bundle = build_dataset(config.data, tokenizer, template, stage=config.finetuning.stage, seed=config.training.seed,
                           cache_dir=cache_dir)
    if any(source.path.glob("*.safetensors")) or not any(source.path.glob("*.bin")):
        scan_checkpoint(source.path)  # .bin-only directories are read by transformers itself
    return PreparedInputs(tokenizer=tokenizer, template=template, bundle=bundle, hf_config=source.hf_config,
                          cache_dir=cache_dir)


def _meta_model(hf_config: PretrainedConfig) -> nn.Module | None:
    """The model built on the meta device (no memory, no weights read), or None when transformers cannot build it
    without running the directory's own code."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, ImportError, OSError):
        return None


def _lora_dims(module: nn.Module) -> set[tuple[int, int]]:
    """(in, out) pairs a LoRA on `module` may have: a linear layer's, or a fused-experts parameter's per expert."""
    if isinstance(module, nn.Linear):
        return {(module.in_features, module.out_features)}
    pairs = set()
    for param in module.parameters(recurse=False):
        if param.dim() in (2, 3):
            pairs.add((param.shape[-1], param.shape[-2]))
    return pairs


def adapter_tensor_shapes(adapter_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of an adapter's weights file, read from its header (no tensor data)."""
    from safetensors import SafetensorError, safe_open

    from kllama.model.adapters import ADAPTER_WEIGHTS

    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise KllamaError(f"adapter_name_or_path: {str(adapter_dir)!r} has no {ADAPTER_WEIGHTS}; give a directory "
                          "written by kllama train or PEFT")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise KllamaError(f"adapter_name_or_path: {str(file)!r} is not a readable safetensors file ({exc}); "
                          "write the adapter again") from None


def check_adapter_fits(adapter_dir: str | Path, hf_config: PretrainedConfig, model_dir: Path) -> None:
    """Check an adapter against the model before any weight loads: its config must be readable and each LoRA
    tensor must target a module of this model with matching input / output sizes (an adapter trained on a model of
    another hidden size fails here, with both sizes named)."""
    from kllama.model.adapters import read_adapter_config

    read_adapter_config(adapter_dir)
    shapes = adapter_tensor_shapes(adapter_dir)
    model = _meta_model(hf_config)
    if model is None:
        return  # no native class to compare against: the load itself reports a mismatch
    modules = dict(model.named_modules())
    problems: list[str] = []
    for key, shape in shapes.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or len(shape) != 2:
            continue
        name = key.removeprefix(_PEFT_PREFIX).removesuffix(suffix).replace(".base_layer", "")
        module = modules.get(name)
        if module is None:
            problems.append(f"{key}: this model has no module {name!r}")
            continue
        dims = _lora_dims(module)
        ins, outs = {d[0] for d in dims}, {d[1] for d in dims}
        size, wanted, what = (shape[1], ins, "input") if suffix == ".lora_A.weight" else (shape[0], outs, "output")
        if dims and size not in wanted:
            problems.append(f"{key}: {what} size {size}, but {name} has {what} size {' or '.join(map(str, sorted(wanted)))}")
    if problems:
        listed = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        hidden = getattr(hf_config.get_text_config(), "hidden_size", None)
        raise KllamaError(
            f"adapter_name_or_path: {str(adapter_dir)!r} was not trained on this model ({str(model_dir)!r}, "
            f"{hf_config.model_type}, hidden_size {hidden}):\n  {listed}\n"
            "give an adapter trained on this model, or the model it was trained on"
        )
