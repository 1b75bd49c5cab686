"""`kllama export`'s streaming merge: source tensor in, LoRA delta added, merged tensor out, never the whole model.

Each source safetensors shard becomes one output shard of the same name holding the same tensor names (in key
order): a tensor is read from the mapped file, the deltas of the adapters that adapt it (`kllama.infer.adapter_deltas`)
are added in fp32 in adapter order, and the sum is rounded once into the merge dtype and appended to the output file,
whose header is written first (every name, dtype and shape is known before any data). Host memory therefore holds
about one source tensor, its fp32 sum and its merged copy at a time, plus one expert layer's LoRA factors, whatever
the model's size. Routed experts are merged in the layout the source stores them (per expert: each expert's
gate/up/down rows of its delta; fused: expert by expert into the `[E, 2I, H]` / `[E, H, I]` tensor).

The merge dtype and each tensor's dtype are what the in-memory path (`from_pretrained` + PEFT merge +
`save_pretrained`) writes: `infer_dtype` (auto = the checkpoint's), modules the model class keeps in fp32 stay fp32,
integer tensors are copied; fp8 weights (DeepSeek-V3's layout) are dequantized and their `weight_scale_inv` dropped.
The model class is built on the meta device (no memory) only for that and for transformers' checkpoint key names.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from kllama.errors import KllamaError
from kllama.experts.families import FAMILIES, find_expert_modules, layer_index
from kllama.experts.quant import dequantize_blocks
from kllama.infer.adapter_deltas import AdapterFactors, CannotStream
from kllama.model.checkpoint import (INDEX_FILE, SAFETENSORS_DTYPES, CheckpointIndex, ExpertLayerKeys, ShardReader,
                                     role_rows, scan_checkpoint)
from kllama.model.load import fill_pad_token_id
from kllama.model.meta_load import build_meta_model, checkpoint_renamer, fp32_kept
from kllama.model.source import ModelSource

_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the export: its key, the dtype it is written in, its shape, and for routed experts which
    layer, role (gate / up / down per expert; gate_up / down fused) and expert (None when fused) it is."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    expert: tuple[ExpertLayerKeys, str, int | None] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (every name, dtype, shape and offset) goes first,
    then each tensor's bytes as it is produced, so no shard is ever held whole. Tensors come in the planned order."""

    def __init__(self, path: Path, tensors: list[OutTensor]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in tensors:
            header[t.key] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path, self._pending = path, list(reversed(tensors))
        self._file: BinaryIO = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, tensor: Tensor) -> None:
        """Append the next planned tensor (its dtype and shape must be the planned ones)."""
        want = self._pending.pop()
        if tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
            raise RuntimeError(f"{want.key}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {want.dtype} "
                               f"{want.shape}")
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise RuntimeError(f"{self.path}: {len(self._pending)} planned tensor(s) never written")


@dataclass
class MergePlan:
    """What the streamed export writes: the output tensors of each source file, and the adapters' factors."""

    index: CheckpointIndex
    files: dict[Path, list[OutTensor]]
    factors: AdapterFactors
    model: PreTrainedModel  # on the meta device: config, class and generation config for the side files


def plan_merge(source: ModelSource, adapters: list[Path], dtype: torch.dtype) -> MergePlan:
    """Plan the streamed merge of `adapters` into `source`'s checkpoint in `dtype`; `CannotStream` when it cannot
    give what the in-memory merge gives (its message says why)."""
    index = scan_checkpoint(source.path)
    model = build_meta_model(source, dtype=dtype, attn_implementation=None)
    modules = _expert_modules(model, index)
    rename = checkpoint_renamer(model)
    try:
        model_keys = {key: rename(key) for key in index.non_expert_keys()}
    except KllamaError:
        raise CannotStream(f"{source.path} has tensors transformers converts (not only renames) when it loads "
                           f"them") from None
    slots, kept = model.state_dict(), fp32_kept(model, dtype)
    for key, name in model_keys.items():
        slot = slots.get(name)
        if slot is not None and tuple(slot.shape) != index.tensors[key].shape:
            raise KllamaError(f"checkpoint tensor {key} has shape {index.tensors[key].shape} but the model expects "
                              f"{tuple(slot.shape)} for {name}; config.json does not match the weights")
    expert_of = _expert_roles(index)
    files: dict[Path, list[OutTensor]] = {f: [] for f in index.files}
    dropped = set(index.scales.values())
    for key in sorted(index.tensors):
        info = index.tensors[key]
        if key in dropped:
            continue
        out_dtype = info.dtype
        if key in expert_of:
            out_dtype = dtype
        elif info.dtype.is_floating_point:
            slot = slots.get(model_keys[key])
            out_dtype = kept(model_keys[key]) or (slot.dtype if slot is not None and slot.is_floating_point()
                                                  else dtype)
        files[info.file].append(OutTensor(key, out_dtype, info.shape, expert_of.get(key)))
    weights = {name: (key, index.tensors[key].shape) for key, name in model_keys.items()}
    return MergePlan(index, files, AdapterFactors(adapters, weights, modules), model)


def _expert_roles(index: CheckpointIndex) -> dict[str, tuple[ExpertLayerKeys, str, int | None]]:
    """Checkpoint key of each routed-expert tensor -> (its layer, role, expert): per expert gate / up / down of
    expert e, fused gate_up / down of every expert (None)."""
    out: dict[str, tuple[ExpertLayerKeys, str, int | None]] = {}
    for keys in index.expert_layers.values():
        if keys.layout == "fused":
            out.update({keys.key(role): (keys, role, None) for role in ("gate_up", "down")})
        else:
            out.update({keys.key(role, e): (keys, role, e) for e in range(keys.num_experts)
                        for role in ("gate", "up", "down")})
    return out


def _expert_modules(model: PreTrainedModel, index: CheckpointIndex) -> dict[str, ExpertLayerKeys]:
    """Routed-experts module path -> the checkpoint's experts of its layer. Expert layers the model lacks (e.g.
    DeepSeek-V3's multi-token-prediction layer 61) are copied as they are, as other tensors the model does not load."""
    if not index.expert_layers:
        return {}
    if model.config.model_type not in FAMILIES:
        raise CannotStream(f"model_type {model.config.model_type!r} stores routed experts kllama does not map "
                           f"(families: {', '.join(sorted(FAMILIES))})")
    spec = FAMILIES[model.config.model_type]
    out = {}
    for name, module in find_expert_modules(model).items():
        keys = index.expert_layers.get(layer_index(name, spec))
        if keys is None:
            raise KllamaError(f"{index.model_dir}: the checkpoint has no routed experts for {name}; the files are "
                              f"incomplete or belong to another model")
        got = ((keys.num_experts, 2 * keys.intermediate, keys.hidden), (keys.num_experts, keys.hidden,
                                                                         keys.intermediate))
        if got != (tuple(module.gate_up_proj.shape), tuple(module.down_proj.shape)):
            raise KllamaError(f"{keys.prefix}: checkpoint experts are gate_up {got[0]} / down {got[1]} but the config "
                              f"builds {tuple(module.gate_up_proj.shape)} / {tuple(module.down_proj.shape)}; "
                              f"config.json does not match the weights")
        out[name] = keys
    return out


def _merged(t: OutTensor, plan: MergePlan, reader: ShardReader) -> Tensor:
    """The merged value of `t`: source (fp8 dequantized) + every adapter's delta, summed in fp32, rounded once."""
    src = reader.get(t.key)
    if t.expert is None:
        deltas = plan.factors.linear.get(t.key, [])
    else:
        keys, role, expert = t.expert
        deltas = plan.factors.experts.get((keys.layer, "down_proj" if role == "down" else "gate_up_proj"), [])
    scale = plan.index.scales.get(t.key)
    if scale is not None:
        src = dequantize_blocks(src, reader.get(scale), torch.float32 if deltas else t.dtype)
    if not deltas:
        return src.to(t.dtype)
    if t.expert is None:
        return _summed(src, [plan.factors.linear_delta(f) for f in deltas]).to(t.dtype)
    if expert is not None:  # one expert's projection [out, in]
        rows = slice(None) if role == "down" else role_rows(keys, role, False)
        return _summed(src, [plan.factors.expert_delta(f, expert, rows) for f in deltas]).to(t.dtype)
    out = torch.empty(t.shape, dtype=t.dtype)  # fused [E, out, in], expert by expert
    for e in range(keys.num_experts):
        out[e] = _summed(src[e], [plan.factors.expert_delta(f, e) for f in deltas])
    return out


def _summed(src: Tensor, deltas: list[Tensor]) -> Tensor:
    # the source in fp32 plus the fp32 deltas in adapter order
    total = src.to(torch.float32, copy=True)
    for delta in deltas:
        total += delta
    return total


@torch.no_grad()
def write_streamed(plan: MergePlan, out_dir: Path, *, show_progress: bool = True) -> None:
    """Write the merged weights of `plan` into `out_dir`: one shard per source shard, same names, plus the
    safetensors index when the source has one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = plan.index
    weight_map: dict[str, str] = {}
    with tqdm(total=index.total_bytes(), unit="B", unit_scale=True, desc="merging weights",
              disable=not show_progress) as bar:
        for source_file, tensors in plan.files.items():
            # a reader per shard: closing it unmaps what was read of this file (resident pages until then)
            writer, reader = SafetensorsWriter(out_dir / source_file.name, tensors), ShardReader(index)
            try:
                for t in tensors:
                    writer.write(_merged(t, plan, reader))
                    weight_map[t.key] = source_file.name
                    scale = index.scales.get(t.key)
                    bar.update(index.tensors[t.key].nbytes + (index.tensors[scale].nbytes if scale else 0))
            finally:
                reader.close()
                writer.close()
    if (index.model_dir / INDEX_FILE).is_file():
        everything = [t for tensors in plan.files.values() for t in tensors]
        metadata = {"total_parameters": sum(math.prod(t.shape) for t in everything),
                    "total_size": sum(t.nbytes for t in everything)}
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": metadata, "weight_map": dict(sorted(
            weight_map.items()))}, indent=2) + "\n")


def write_side_files(plan: MergePlan, tokenizer: PreTrainedTokenizerBase, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json, generation_config.json and the tokenizer files as the in-memory export writes them: the
    config in the merge dtype with the model class as architecture and no fp8 `quantization_config`, pad ids filled
    from the tokenizer where the source names none."""
    model, source_dir = plan.model, plan.index.model_dir
    if (source_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(source_dir))
    fill_pad_token_id(model, tokenizer)
    config = model.config
    if plan.index.scales and hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights were dequantized
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
