"""`kllama export`: merge the adapter(s) into the base weights and write a standard Hugging Face checkpoint.

By default the merge streams (`kllama.infer.stream_merge`): each source shard is read tensor by tensor, the LoRA
deltas added, and written to a shard of the same name with the same tensor names, so exporting needs about one
tensor of host memory instead of the whole model (2.6x the checkpoint, measured on DeepSeek-V2-Lite, for the path
below). Where streaming cannot give the same weights (a model type only the directory's own code knows, PyTorch
.bin weights, adapter features it does not implement) one line says why and the merge runs in memory: peft's
`merge_and_unload` on stock transformers (expert LoRA on the fused experts included), then `save_pretrained`,
which turns transformers 5's fused experts back into the per-expert tensors hub checkpoints use, so vLLM / SGLang
/ older transformers read the result. We check the written key names against the source checkpoint's and, when
the source stored experts fused, write them fused as well.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kllama.config.loader import KllamaConfig
from kllama.errors import KllamaError
from kllama.infer.adapter_deltas import CannotStream
from kllama.infer.stream_merge import plan_merge, write_side_files, write_streamed
from kllama.model.adapters import adapter_dirs, check_adapter_templates
from kllama.model.checkpoint import scan_checkpoint
from kllama.model.load import load_model, load_tokenizer, scan_weights, weights_dtype
from kllama.model.source import check_model_dir, read_model_source

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


def copy_side_files(source_dir: Path, out_dir: Path) -> None:
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


def export_streamed(config: KllamaConfig, out_dir: Path) -> int:
    """Merge `adapter_name_or_path` into `model_name_or_path` shard by shard into `out_dir` (see stream_merge) and
    return the number of adapters merged; `CannotStream` (before anything is written) where it cannot."""
    source = read_model_source(config.model.model_name_or_path, trust_remote_code=config.model.trust_remote_code)
    if source.remote_code:
        raise CannotStream(f"model_type {source.model_type!r} is built by the directory's own code (auto_map)")
    index = scan_weights(source.path)
    if index is None:
        raise CannotStream(f"{source.path} holds PyTorch .bin weights")
    adapters = adapter_dirs(config.model.adapter_name_or_path)
    check_adapter_templates(config.data.template, adapters)
    dtype = weights_dtype(config, "export", source, index)
    plan = plan_merge(source, adapters, dtype)
    tokenizer = load_tokenizer(source, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.safetensors*"):  # an earlier export's shards may be named otherwise
        stale.unlink()
    write_streamed(plan, out_dir)
    write_side_files(plan, tokenizer, out_dir, dtype)
    copy_side_files(source.path, out_dir)
    return len(adapters)


def export_in_memory(config: KllamaConfig, model_dir: Path, out_dir: Path) -> int:
    """The whole model loaded with its adapters merged by PEFT, then written; returns the number of adapters."""
    loaded = load_model(config, "export")
    write_merged_checkpoint(loaded.model, loaded.tokenizer, out_dir,
                            max_shard_size=f"{config.export.export_size}GB", source_dir=model_dir)
    copy_side_files(model_dir, out_dir)
    return len(loaded.adapters)


def run_export(config: KllamaConfig) -> int:
    """Entry point of `kllama export`: merge the adapters into the base weights (streamed, or in memory where
    streaming cannot apply) and write them as a standard checkpoint."""
    model_dir = check_model_dir(config.model.model_name_or_path)
    out_dir = Path(config.export.export_dir or "")
    if out_dir.resolve() == model_dir.resolve():
        raise KllamaError("export_dir: must differ from model_name_or_path (the source would be overwritten)")
    if not config.model.adapter_name_or_path:
        logger.warning("no adapter_name_or_path given: the export is a copy of the base model (in infer_dtype)")
    print_dequantized_note(config, model_dir)
    try:
        count = export_streamed(config, out_dir)
    except CannotStream as exc:
        print(f"kllama export: {exc}, which the streamed merge does not handle; merging in memory instead (the "
              f"whole model is loaded)", flush=True)
        count = export_in_memory(config, model_dir, out_dir)
    print(f"kllama export: wrote the merged model ({count} adapter(s)) to {out_dir}")
    return 0
