"""Index a Hugging Face safetensors checkpoint and read routed experts straight into one host buffer per layer.

Checkpoints store routed experts in one of two layouts, and an exporter must be able to write the same one back:

* `per_expert`: one tensor per expert and projection, as hub checkpoints do
  (`model.layers.N.mlp.experts.E.gate_proj.weight` / `up_proj` / `down_proj`; Mixtral
  `model.layers.N.block_sparse_moe.experts.E.w1` (gate) / `w3` (up) / `w2` (down)).
* `fused`: transformers 5.x's in-memory layout (`model.layers.N.mlp.experts.gate_up_proj [E, 2I, H]`,
  `down_proj [E, H, I]`).

fp8 checkpoints (DeepSeek-V3's layout) store a weight `X.weight` in float8_e4m3fn next to its fp32 block scales
`X.weight_scale_inv [ceil(N/128), ceil(K/128)]` (`weight = value * scale`, despite the name). The index pairs them
(`CheckpointIndex.scales`); routed experts may stay fp8 with their scales (`expert_dtype`, see
`kllama.experts.quant`), every other fp8 weight is dequantized when it is loaded.

Files are opened with `safetensors.safe_open`, which memory-maps them; every tensor read is copied into its final
home at once. Pages of a mapping count towards the process's resident memory until the mapping is dropped, so the
reader reopens a file after every `MAP_BUDGET_BYTES` read; together this keeps peak host memory near the model size.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from kllama.errors import KllamaError
from kllama.experts.quant import (BLOCK, QUANT_DTYPES, ExpertWeight, QuantizedWeight, dequantize,
                                  quantize_projection, scale_shape, values_shape)
from kllama.experts.shared_host import expert_host_buffer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REFETCH = "download the model again (or re-export it with `kllama export` / save_pretrained)"
MAP_BUDGET_BYTES = 16 * 2**20  # bytes read through one mapping before it is dropped and the file reopened

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Per-expert projection names in checkpoints -> role in the fused layout (gate rows first, then up).
_PROJ_ROLES: dict[str, str] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up",
                               "w2": "down"}
_EXPERTS_PREFIX = r"(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts)"
_PER_EXPERT_KEY = re.compile(
    _EXPERTS_PREFIX + r"\.(?P<expert>\d+)\.(?P<proj>" + "|".join(_PROJ_ROLES) + r")\.weight$")
_FUSED_KEY = re.compile(_EXPERTS_PREFIX + r"\.(?P<proj>gate_up_proj|down_proj)$")
SCALE_SUFFIX = "_scale_inv"  # fp8 checkpoints: `X.weight_scale_inv` holds the block scales of `X.weight`


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives and what it is."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertLayerKeys:
    """The routed-expert tensors of one MoE layer in the checkpoint: layout, sizes and exact key naming.

    `names` maps a role to the checkpoint's projection name: per_expert `{"gate": "w1", "up": "w3", "down": "w2"}`
    (or `gate_proj/up_proj/down_proj`), fused `{"gate_up": "gate_up_proj", "down": "down_proj"}`.
    """

    layer: int
    prefix: str  # e.g. "model.layers.3.block_sparse_moe.experts" (checkpoint naming, not the module path)
    layout: str  # per_expert | fused
    num_experts: int
    hidden: int
    intermediate: int
    dtype: torch.dtype
    names: dict[str, str] = field(hash=False)
    scaled: bool = False  # fp8 with 128x128 block scales (`<key>_scale_inv`), per_expert layout only

    def key(self, role: str, expert: int | None = None) -> str:
        """Checkpoint key of `role` (gate/up/down per expert; gate_up/down fused) for `expert` (per_expert only)."""
        if self.layout == "fused":
            return f"{self.prefix}.{self.names[role]}"
        return f"{self.prefix}.{expert}.{self.names[role]}.weight"

    def keys(self) -> list[str]:
        """Every checkpoint key of this layer's routed experts (block scales included)."""
        if self.layout == "fused":
            return [self.key("gate_up"), self.key("down")]
        weights = [self.key(r, e) for e in range(self.num_experts) for r in ("gate", "up", "down")]
        return weights + [k + SCALE_SUFFIX for k in weights] if self.scaled else weights

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the fused host buffer for this layer (in `dtype`, default the checkpoint's)."""
        elements = self.num_experts * 3 * self.intermediate * self.hidden
        return elements * (dtype or self.dtype).itemsize


@dataclass
class CheckpointIndex:
    """Every tensor of a safetensors checkpoint (key -> file, dtype, shape) and its routed-expert layers."""

    model_dir: Path
    tensors: dict[str, TensorInfo]
    expert_layers: dict[int, ExpertLayerKeys]  # layer index -> keys, in layer order
    scales: dict[str, str] = field(default_factory=dict)  # fp8 weight key -> its block-scale key

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def expert_keys(self) -> set[str]:
        """Keys that belong to routed experts (loaded by `load_expert_layer`)."""
        return {k for layer in self.expert_layers.values() for k in layer.keys()}

    def non_expert_keys(self) -> list[str]:
        """Every other key, grouped by file (so reading them in this order opens each file once)."""
        skip = self.expert_keys() | set(self.scales.values())
        return sorted((k for k in self.tensors if k not in skip), key=lambda k: (self.tensors[k].file, k))

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def expert_bytes(self) -> int:
        return sum(self.tensors[k].nbytes for k in self.expert_keys())


def _checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of `model_dir` (single file, or every shard named by the index)."""
    if not model_dir.is_dir():
        raise KllamaError(f"model directory {str(model_dir)!r} does not exist; check model_name_or_path "
                          f"(kllama loads local directories; download hub models first)")
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise KllamaError(f"{index} is not a valid safetensors index ({exc}); re-save the model") from exc
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise KllamaError(f"{model_dir}: shard file(s) {', '.join(missing)} named in {INDEX_FILE} are missing; "
                              f"{REFETCH}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")):
        raise KllamaError(f"{model_dir} holds PyTorch .bin weights only; kllama reads safetensors: re-save with "
                          f"model.save_pretrained(dir) (safe_serialization is the default)")
    raise KllamaError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}; point model_name_or_path at a Hugging "
                      f"Face model directory")


def _expert_layer(layer: int, found: dict[str, Any], tensors: dict[str, TensorInfo], scales: dict[str, str],
                  ) -> ExpertLayerKeys:
    """Check one layer's expert keys are complete and consistent; build its ExpertLayerKeys."""
    prefix = found["prefix"]
    if found["fused"] and found["experts"]:
        raise KllamaError(f"{prefix}: checkpoint mixes fused and per-expert tensors; re-save the model")
    if found["fused"]:
        if any(f"{prefix}.{name}" in scales for name in found["fused"].values()):
            raise KllamaError(f"{prefix}: fused fp8 experts with block scales are not supported; use a checkpoint "
                              f"that stores one tensor per expert (DeepSeek-V3's layout)")
        names = dict(found["fused"])
        if set(names) != {"gate_up", "down"}:
            raise KllamaError(f"{prefix}: fused experts need gate_up_proj and down_proj; found only {sorted(names)}")
        gu, dn = tensors[f"{prefix}.gate_up_proj"], tensors[f"{prefix}.down_proj"]
        if len(gu.shape) != 3 or len(dn.shape) != 3 or gu.shape[0] != dn.shape[0] or gu.shape[1] != 2 * dn.shape[2] \
                or gu.shape[2] != dn.shape[1]:
            raise KllamaError(f"{prefix}: gate_up_proj {gu.shape} and down_proj {dn.shape} are not "
                              f"[E, 2I, H] and [E, H, I]")
        return ExpertLayerKeys(layer, prefix, "fused", gu.shape[0], gu.shape[2], dn.shape[2], gu.dtype, names)
    experts: dict[int, dict[str, str]] = found["experts"]
    num = max(experts) + 1
    names = {role: proj for roles in experts.values() for role, proj in roles.items()}
    for e in range(num):
        absent = {"gate", "up", "down"} - set(experts.get(e, {}))
        if absent:
            raise KllamaError(f"{prefix}.{e}: missing {', '.join(sorted(absent))} projection(s) in the checkpoint; "
                              f"the download is incomplete or the file is corrupt")
    layer_keys = ExpertLayerKeys(layer, prefix, "per_expert", num, 0, 0, torch.float32, names)
    gate = tensors[layer_keys.key("gate", 0)]
    inter, hidden = gate.shape
    want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    for e in range(num):
        for role, shape in want.items():
            got = tensors[layer_keys.key(role, e)].shape
            if got != shape:
                raise KllamaError(f"{layer_keys.key(role, e)} has shape {got}, expected {shape} like expert 0")
    scaled = [layer_keys.key(r, e) in scales for e in range(num) for r in ("gate", "up", "down")]
    if any(scaled) and not all(scaled):
        raise KllamaError(f"{prefix}: some expert weights have {SCALE_SUFFIX} block scales and others not; the "
                          f"checkpoint is incomplete ({REFETCH})")
    return ExpertLayerKeys(layer, prefix, "per_expert", num, hidden, inter, gate.dtype, names, scaled=all(scaled))


def scan_checkpoint(model_dir: str | Path) -> CheckpointIndex:
    """Index `model_dir`'s safetensors (single file or sharded) without reading any tensor data.

    Records every key's file, dtype and shape, finds the routed-expert layers and their layout (per_expert or
    fused) and the checkpoint's own projection names. Raises KllamaError for a missing directory/file/shard or an
    incomplete expert set.
    """
    root = Path(model_dir)
    tensors: dict[str, TensorInfo] = {}
    for path in _checkpoint_files(root):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise KllamaError(f"{path.name}: tensor {key} has dtype {sl.get_dtype()} kllama cannot load")
                    tensors[key] = TensorInfo(path, dtype, tuple(sl.get_shape()))
        except (OSError, RuntimeError, SafetensorError) as exc:  # a truncated, empty or non-safetensors file
            raise KllamaError(f"{path} is incomplete or corrupt ({exc}); {REFETCH}") from None
    layers: dict[int, dict[str, Any]] = defaultdict(lambda: {"prefix": "", "experts": defaultdict(dict), "fused": {}})
    for key in tensors:
        if m := _PER_EXPERT_KEY.match(key):
            found = layers[int(m["layer"])]
            found["experts"][int(m["expert"])][_PROJ_ROLES[m["proj"]]] = m["proj"]
        elif m := _FUSED_KEY.match(key):
            found = layers[int(m["layer"])]
            found["fused"]["gate_up" if m["proj"] == "gate_up_proj" else "down"] = m["proj"]
        else:
            continue
        found["prefix"] = m["prefix"]
    scales = _block_scales(tensors)
    expert_layers = {layer: _expert_layer(layer, layers[layer], tensors, scales) for layer in sorted(layers)}
    return CheckpointIndex(root, tensors, expert_layers, scales)


def _block_scales(tensors: dict[str, TensorInfo]) -> dict[str, str]:
    """fp8 weight key -> its `_scale_inv` key, each checked to be a 128x128 block grid over a 2-D fp8 weight."""
    scales: dict[str, str] = {}
    for key, info in tensors.items():
        if not key.endswith(SCALE_SUFFIX):
            continue
        weight_key = key[: -len(SCALE_SUFFIX)]
        weight = tensors.get(weight_key)
        if weight is None:
            raise KllamaError(f"checkpoint tensor {key} has no {weight_key}; the download is incomplete ({REFETCH})")
        if weight.dtype != torch.float8_e4m3fn or len(weight.shape) != 2:
            raise KllamaError(f"{weight_key}: block scales are read for 2-D float8_e4m3fn weights only, this one is "
                              f"{weight.dtype} {weight.shape}")
        want = scale_shape("fp8", weight.shape)
        if tuple(info.shape) != want:
            raise KllamaError(f"{key} has shape {info.shape}, expected {want}: kllama reads fp8 checkpoints with "
                              f"{BLOCK}x{BLOCK} block scales (quantization_config.weight_block_size [{BLOCK}, {BLOCK}])")
        scales[weight_key] = key
    return scales


class ShardReader:
    """Reads tensors by key, keeping at most one mapping per file open and dropping it every `budget` bytes.

    `get` returns a tensor backed by the file mapping: copy it into its destination and drop it.
    """

    def __init__(self, index: CheckpointIndex, budget: int = MAP_BUDGET_BYTES) -> None:
        self.index, self.budget = index, budget
        self._open: dict[Path, Any] = {}
        self._read: dict[Path, int] = defaultdict(int)

    def _handle(self, path: Path) -> Any:
        if self._read[path] >= self.budget:
            self._open.pop(path, None)  # dropping the handle unmaps the pages read so far
            self._read[path] = 0
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def _info(self, key: str) -> TensorInfo:
        info = self.index.tensors.get(key)
        if info is None:
            raise KllamaError(f"tensor {key!r} is missing from the checkpoint in {self.index.model_dir}; the "
                              f"download is incomplete or the model files do not match its config")
        return info

    def get(self, key: str) -> Tensor:
        """The whole tensor `key` (mapping-backed)."""
        info = self._info(key)
        t = self._handle(info.file).get_tensor(key)
        self._read[info.file] += info.nbytes
        return t

    def get_row(self, key: str, row: int) -> Tensor:
        """`tensor[row]` of `key` without touching the other rows (mapping-backed)."""
        info = self._info(key)
        t = self._handle(info.file).get_slice(key)[row]
        self._read[info.file] += info.nbytes // max(info.shape[0], 1)
        return t

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def allocate_layer_buffer(keys: ExpertLayerKeys, dtype: torch.dtype, pin: bool) -> tuple[Tensor, Tensor, bool]:
    """One host allocation for a layer, viewed as `gate_up [E, 2I, H]` and `down [E, H, I]`, and whether it already
    holds the weights (another rank of this node read them: `kllama.experts.shared_host`).

    `pin=True` page-locks it (host->GPU copies run ~3x faster) when CUDA is available; without CUDA there is
    nothing to pin for and plain memory is used.
    """
    gate_up, down = _layer_shapes(keys)
    (gate_up_buf, down_buf), filled = _one_allocation((gate_up, down), dtype, pin)
    return gate_up_buf, down_buf, filled


def _layer_shapes(keys: ExpertLayerKeys) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    # the logical weight shapes: gate_up [E, 2I, H], down [E, H, I]
    e, h, i = keys.num_experts, keys.hidden, keys.intermediate
    return (e, 2 * i, h), (e, h, i)


def _one_allocation(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, pin: bool,
                    ) -> tuple[list[Tensor], bool]:
    # one host buffer (`expert_host_buffer`) viewed as consecutive tensors of `shapes`, and whether it is filled
    sizes = [math.prod(shape) for shape in shapes]
    flat, filled = expert_host_buffer(sum(sizes), dtype, pin=pin)
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)], filled


def allocate_quantized_layer(keys: ExpertLayerKeys, scheme: str, dtype: torch.dtype, pin: bool,
                             ) -> tuple[QuantizedWeight, QuantizedWeight, bool]:
    """Host buffers of a layer quantized with `scheme` (int8 | int4 | fp8): one allocation for the values (as
    stored: int4's packed `[..., K / 2]`), one for the scales (see `kllama.experts.quant`), as `gate_up` (two
    projections: gate, up) and `down` QuantizedWeights that dequantize to `dtype`, and whether they already hold
    the weights (as `allocate_layer_buffer`)."""
    shapes = _layer_shapes(keys)
    values, filled = _one_allocation([values_shape(scheme, s) for s in shapes], QUANT_DTYPES[scheme], pin)
    scales, _ = _one_allocation([scale_shape(scheme, s, projections=p) for s, p in zip(shapes, (2, 1))],
                                torch.float32, pin)
    return (QuantizedWeight(values[0], scales[0], dtype, projections=2),
            QuantizedWeight(values[1], scales[1], dtype), filled)


def expert_scheme(expert_dtype: str, keys: ExpertLayerKeys) -> str | None:
    """How a layer's routed experts are held for `expert_dtype` (auto | bf16 | fp8 | int8 | int4): None = not
    quantized (the model's weights dtype), else the scheme. `auto` keeps an fp8 checkpoint's experts fp8 (and never
    picks int4)."""
    if expert_dtype == "auto":
        return "fp8" if keys.scaled else None
    return None if expert_dtype == "bf16" else expert_dtype


def _expert_parts(keys: ExpertLayerKeys, expert: int, reader: ShardReader,
                  ) -> Iterator[tuple[str, Tensor, Tensor | None]]:
    # (role, values, block scales or None) of one expert's gate, up and down projections (mapping-backed)
    if keys.layout == "fused":
        gate_up = reader.get_row(keys.key("gate_up"), expert)  # [2I, H]
        yield "gate", gate_up[: keys.intermediate], None
        yield "up", gate_up[keys.intermediate:], None
        yield "down", reader.get_row(keys.key("down"), expert), None
        return
    for role in ("gate", "up", "down"):
        key = keys.key(role, expert)
        yield role, reader.get(key), reader.get(key + SCALE_SUFFIX) if keys.scaled else None


def _full_precision(values: Tensor, scales: Tensor | None) -> Tensor:
    return values if scales is None else dequantize(QuantizedWeight(values, scales.float(), torch.float32))


def role_rows(keys: ExpertLayerKeys, role: str, per_block: bool) -> slice:
    """Rows of `role` (gate, up, down) in its fused projection (gate_up: gate rows first, then up; down: all), in
    values or, with `per_block`, in fp8 block scales."""
    inter = math.ceil(keys.intermediate / BLOCK) if per_block else keys.intermediate
    return {"gate": slice(0, inter), "up": slice(inter, 2 * inter), "down": slice(None)}[role]


def _fill_dense(keys: ExpertLayerKeys, expert: int, reader: ShardReader, gate_up: Tensor, down: Tensor) -> None:
    for role, values, scales in _expert_parts(keys, expert, reader):
        target = down if role == "down" else gate_up
        target[expert, role_rows(keys, role, False)].copy_(_full_precision(values, scales))


def _fill_quantized(keys: ExpertLayerKeys, expert: int, reader: ShardReader, gate_up: QuantizedWeight,
                    down: QuantizedWeight) -> None:
    # an fp8 checkpoint's values and scales are copied as they are into fp8 buffers; anything else is quantized
    # here, one projection of one expert at a time (the only full-precision copy that ever exists)
    scheme = gate_up.scheme
    for role, values, scales in _expert_parts(keys, expert, reader):
        target = down if role == "down" else gate_up
        if scales is not None and scheme == "fp8":
            quantized = (values, scales)
        else:
            quantized = quantize_projection(_full_precision(values, scales), scheme)
        target.data[expert, role_rows(keys, role, False)].copy_(quantized[0])
        target.scale[expert, role_rows(keys, role, scheme == "fp8")].copy_(quantized[1])


def load_expert_layer(index: CheckpointIndex, layer_idx: int, *, dtype: torch.dtype, pin: bool,
                      reader: ShardReader | None = None, expert_dtype: str = "auto",
                      ) -> tuple[ExpertWeight, ExpertWeight]:
    """Read layer `layer_idx`'s routed experts into fresh host buffers: `(gate_up [E, 2I, H], down [E, H, I])`,
    tensors in `dtype` or QuantizedWeights (`expert_dtype`, see `expert_scheme`).

    Each expert projection is copied from the mapped file straight into its place in the buffer (converted to
    `dtype`, or quantized, or for fp8 checkpoints dequantized first), so no second full copy of the layer ever
    exists. `gate_up` rows are gate then up, as transformers fuses them. Pass a `reader` to share open files across
    layers.
    """
    keys = index.expert_layers.get(layer_idx)
    if keys is None:
        raise KllamaError(f"layer {layer_idx} has no routed experts in {index.model_dir}; layers with experts: "
                          f"{sorted(index.expert_layers)}")
    scheme = expert_scheme(expert_dtype, keys)
    if scheme is None:
        gate_up, down, filled = allocate_layer_buffer(keys, dtype, pin)  # [E, 2I, H], [E, H, I]
        fill: Callable[..., None] = _fill_dense
    else:
        gate_up, down, filled = allocate_quantized_layer(keys, scheme, dtype, pin)
        fill = _fill_quantized
    if filled:
        return gate_up, down
    own = reader is None
    reader = reader or ShardReader(index)
    try:
        for e in range(keys.num_experts):
            fill(keys, e, reader, gate_up, down)
    finally:
        if own:
            reader.close()
    return gate_up, down


def iter_tensors(index: CheckpointIndex, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
    """Yield `(key, tensor)` for `keys` in the given order; each tensor is mapping-backed (copy it, then drop it)."""
    with ShardReader(index) as reader:
        for key in keys:
            yield key, reader.get(key)
