"""`kllama export`: merge the adapter(s) into the base weights and write a standard Hugging Face checkpoint.

Merging is peft's `merge_and_unload` on stock transformers (expert LoRA on the fused experts included), then
`save_pretrained`, which turns transformers 5's fused experts back into the per-expert tensors hub checkpoints
use, so vLLM / SGLang / older transformers read the result. We check the written key names against the source
checkpoint's and, when the source stored experts fused, write them fused as well.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kllama.config.loader import KllamaConfig
from kllama.errors import KllamaError
from kllama.model.checkpoint import scan_checkpoint
from kllama.model.load import load_model
from kllama.model.source import check_model_dir

logger = logging.getLogger(__name__)

def checkpoint_keys(model_dir: str | Path) -> set[str]:
    """Tensor names of a safetensors checkpoint directory (sharded with an index, or single-file), fp8 block scales
    left out (they belong to their weight, which an unquantized export writes without them)."""
    index = scan_checkpoint(model_dir)
    return set(index.tensors) - set(index.scales.values())


def _rewrite_in_memory_layout(model: PreTrainedModel, out_dir: Path, max_shard_size: str | int) -> None:
    """Replace the written weights with the model's in-memory tensors (fused experts), sharded the same way."""
    from huggingface_hub import save_torch_state_dict

    for stale in out_dir.glob("model*.safetensors*"):
        stale.unlink()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_torch_state_dict(state, str(out_dir), max_shard_size=max_shard_size, metadata={"format": "pt"})


def write_merged_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    max_shard_size: str | int = "5GB",
    source_dir: str | Path | None = None,
) -> Path:
    """Write `model` (adapters already merged) + tokenizer + generation config as sharded safetensors with an index.

    With `source_dir`, the tensor names follow the source checkpoint: per-expert keys when it has them (what
    `save_pretrained` writes), fused expert tensors when the source stored those; any other difference is warned.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    if source_dir is not None:
        source = checkpoint_keys(source_dir)
        written = checkpoint_keys(out)
        if written != source and set(model.state_dict()) == source:
            _rewrite_in_memory_layout(model, out, max_shard_size)
        elif written != source:
            only_src, only_out = sorted(source - written), sorted(written - source)
            logger.warning("the merged checkpoint's tensor names differ from the source's (%d only in the source, "
                           "e.g. %s; %d only in the export, e.g. %s)", len(only_src), only_src[:3], len(only_out),
                           only_out[:3])
    return out


def _copy_side_files(source_dir: Path, out_dir: Path) -> None:
    # The directory's own code (auto_map, which the written config keeps) travels with the weights, so tools that
    # load such checkpoints through it still can; kllama itself runs it only for model types transformers lacks.
    for path in source_dir.glob("*.py"):
        shutil.copy2(path, out_dir / path.name)


def print_dequantized_note(config: KllamaConfig, model_dir: Path) -> None:
    """One line when the merge does not use quantized weights as they are: an fp8 checkpoint is dequantized (the
    export is written in the merge dtype), and `expert_dtype: int8/int4/fp8` (how the engine held experts for training
    or serving) does not apply to the merge, which uses the checkpoint's own weights."""
    if scan_checkpoint(model_dir).scales:
        print(f"kllama export: {model_dir.name} stores fp8 weights with 128x128 block scales; they are dequantized "
              f"for the merge and the export is written unquantized ({config.model.infer_dtype} dtype, "
              f"auto = the config's)", flush=True)
    elif config.engine.expert_dtype in ("fp8", "int8", "int4"):
        print(f"kllama export: expert_dtype {config.engine.expert_dtype} applies to the expert engine only; the "
              f"merge uses the checkpoint's unquantized weights", flush=True)


def run_export(config: KllamaConfig) -> int:
    """Entry point of `kllama export`: load base + merged adapters (`load_model(config, "export")`: stock
    transformers on `export_device`) and write them as a standard checkpoint."""
    model_dir = check_model_dir(config.model.model_name_or_path)
    out_dir = Path(config.export.export_dir or "")
    if out_dir.resolve() == model_dir.resolve():
        raise KllamaError("export_dir: must differ from model_name_or_path (the source would be overwritten)")
    if not config.model.adapter_name_or_path:
        logger.warning("no adapter_name_or_path given: the export is a re-sharded copy of the base model")
    print_dequantized_note(config, model_dir)
    loaded = load_model(config, "export")
    write_merged_checkpoint(loaded.model, loaded.tokenizer, out_dir,
                            max_shard_size=f"{config.export.export_size}GB", source_dir=model_dir)
    _copy_side_files(model_dir, out_dir)
    print(f"kllama export: wrote the merged model ({len(loaded.adapters)} adapter(s)) to {out_dir}")
    return 0
