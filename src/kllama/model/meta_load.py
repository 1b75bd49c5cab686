"""Load a Hugging Face MoE checkpoint with its routed experts straight into (pinned) host memory.

The model is built on the meta device (no memory), every non-expert tensor is read from the mapped safetensors into
its final place on the compute device (with the key renames transformers applies for the family, tied embeddings
and re-initialised non-persistent buffers such as rotary `inv_freq`), and each MoE layer's routed experts are read
into one host buffer that becomes a `HostExperts` module. Peak host memory stays close to the model size: nothing
is read twice and file mappings are dropped as the reader goes (see `kllama.model.checkpoint`).

Routed experts may be held quantized (`expert_dtype`: int8 / int4 / fp8, quantized expert by expert as they are
read) and fp8 checkpoints (DeepSeek-V3's layout: float8_e4m3fn weights with 128x128 `weight_scale_inv` blocks) load
too: their non-expert weights are dequantized to the model's dtype, their routed experts stay fp8 unless
`expert_dtype` says otherwise. The built model then holds no fp8 Linear, so its config drops `quantization_config` (a saved or exported
model must not claim to be fp8).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from kllama.errors import KllamaError
from kllama.experts.families import family_of, find_expert_modules, layer_index
from kllama.experts.install import ExpertEngine, wire_engine
from kllama.experts.placement import ExpertPlacement
from kllama.experts.quant import dequantize_blocks
from kllama.model.checkpoint import CheckpointIndex, ShardReader, load_expert_layer, scan_checkpoint
from kllama.model.source import ModelSource

PlacementsFn = Callable[[list[str]], Mapping[str, ExpertPlacement]]


def checkpoint_renamer(model: PreTrainedModel) -> Callable[[str], str]:
    """Checkpoint key -> model state-dict key, using the renames transformers registers for this family
    (e.g. Mixtral's `block_sparse_moe` -> `mlp`); key conversions that change tensors are refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_keys = dict.fromkeys(model.state_dict())

    def rename(key: str) -> str:
        new, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_keys)
        if converter is not None:
            raise KllamaError(f"checkpoint tensor {key!r} needs transformers' {converter!r} conversion, which kllama's "
                              f"loader does not do; set use_kt: false to load this model with stock transformers")
        return new

    return rename


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter or buffer `name`."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    else:
        owner._buffers[attr] = value


def _plan_non_expert(model: PreTrainedModel, index: CheckpointIndex, expert_names: list[str]
                     ) -> tuple[list[tuple[str, str]], set[str]]:
    """`[(checkpoint key, model key)]` to load, and the model keys that must come from elsewhere (tied)."""
    rename = checkpoint_renamer(model)
    targets = model.state_dict()
    tied: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source
    plan: dict[str, str] = {}  # model key -> checkpoint key
    unexpected = []
    for key in index.non_expert_keys():
        name = rename(key)
        if name in targets and not any(name.startswith(e + ".") for e in expert_names):
            plan[name] = key
        else:
            unexpected.append(key)
    for target, source in tied.items():
        if source not in plan and target in plan:  # only the tied copy was saved: load it as the source
            plan[source] = plan.pop(target)
        plan.pop(target, None)
    if unexpected:
        warnings.warn(f"{index.model_dir}: {len(unexpected)} checkpoint tensor(s) not used by the model, e.g. "
                      f"{unexpected[:3]}", stacklevel=3)
    return sorted(plan.items(), key=lambda kv: (index.tensors[kv[1]].file, kv[1])), set(tied)


def fp32_kept(model: PreTrainedModel, dtype: torch.dtype) -> Callable[[str], torch.dtype | None]:
    """Model key -> float32 where the model class asks to keep that weight in fp32 at this `dtype` (e.g.
    DeepSeek-V3's `e_score_correction_bias` in bf16 runs), else None; transformers' own plan and matcher."""
    from transformers.core_model_loading import build_glob_alternation

    plan: dict[str, torch.dtype] = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return lambda name: None
    alternation, by_group, _ = build_glob_alternation(list(plan))

    def lookup(name: str) -> torch.dtype | None:
        m = alternation.search(name)
        return plan[by_group[m.lastgroup]] if m else None

    return lookup


def _load_non_expert(model: PreTrainedModel, index: CheckpointIndex, plan: list[tuple[str, str]],
                     device: torch.device, dtype: torch.dtype, bar: Any) -> None:
    """Copy each planned tensor from the mapped file into a fresh tensor on `device` (dtype of the model's slot,
    or fp32 where the model class keeps it so)."""
    targets = model.state_dict()
    kept = fp32_kept(model, dtype)
    with ShardReader(index) as reader:
        for name, key in plan:
            slot = targets[name]
            if slot.is_floating_point() and (want := kept(name)) is not None:
                slot = slot.to(want)
            src = reader.get(key)
            if key in index.scales:  # fp8 with block scales: dequantized to the slot's dtype
                src = dequantize_blocks(src, reader.get(index.scales[key]), slot.dtype)
            if tuple(src.shape) != tuple(slot.shape):
                raise KllamaError(f"checkpoint tensor {key} has shape {tuple(src.shape)} but the model expects "
                                  f"{tuple(slot.shape)} for {name}; config.json does not match the weights")
            value = torch.empty(slot.shape, dtype=slot.dtype, device=device)
            value.copy_(src)
            del src  # drop the mapping-backed tensor now so its pages can leave memory
            _set_tensor(model, name, value)
            bar.update(index.tensors[key].nbytes)


@torch.no_grad()
def _init_non_persistent_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Give meta non-persistent buffers (rotary `inv_freq`...) real storage and let the model class compute them,
    the same `_init_weights` hook `from_pretrained` uses for them."""
    owners: dict[str, nn.Module] = {}
    for name, buf in model.named_buffers():
        if buf is not None and buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner._buffers[attr] = torch.empty_like(buf, device=device)
            owners[owner_name] = owner
    for owner in owners.values():
        model._init_weights(owner)


def _check_nothing_meta(model: nn.Module, index: CheckpointIndex) -> None:
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise KllamaError(f"{index.model_dir}: the checkpoint has no tensor for {len(missing)} model weight(s), e.g. "
                          f"{missing[:5]}; the files are incomplete or belong to another model")


def _expert_modules_by_layer(model: PreTrainedModel, index: CheckpointIndex) -> dict[int, tuple[str, nn.Module]]:
    """Layer index -> (qualified name, stock experts module), checked against the checkpoint's expert layers."""
    if not index.expert_layers:
        return {}
    spec = family_of(model)
    by_layer = {layer_index(n, spec): (n, m) for n, m in find_expert_modules(model).items()}
    if set(by_layer) != set(index.expert_layers):
        raise KllamaError(f"{index.model_dir}: the config has routed experts in layers {sorted(by_layer)} but the "
                          f"checkpoint in layers {sorted(index.expert_layers)}; config.json does not match the weights")
    for layer, (name, module) in by_layer.items():
        keys = index.expert_layers[layer]
        want = (tuple(module.gate_up_proj.shape), tuple(module.down_proj.shape))
        got = ((keys.num_experts, 2 * keys.intermediate, keys.hidden), (keys.num_experts, keys.hidden,
                                                                         keys.intermediate))
        if want != got:
            raise KllamaError(f"{keys.prefix}: checkpoint experts are gate_up {got[0]} / down {got[1]} but the config "
                              f"builds {want[0]} / {want[1]}; config.json does not match the weights")
    return by_layer


def build_meta_model(source: ModelSource, *, dtype: torch.dtype, attn_implementation: str | None) -> PreTrainedModel:
    """The causal-LM of `source` on the meta device: structure only, no memory (transformers' own class whenever
    it has one; see `kllama.model.source`)."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(source.hf_config, trust_remote_code=source.remote_code, **kwargs)


def load_checkpoint(
    source: ModelSource,
    *,
    placements_fn: PlacementsFn | None,
    compute_device: torch.device | str,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    show_progress: bool = True,
    expert_dtype: str = "auto",
) -> tuple[PreTrainedModel, ExpertEngine | None]:
    """Load the checkpoint of `source` for the expert engine: returns `(model, engine)`.

    Non-expert weights go to `compute_device` in `dtype` (fp32-kept modules stay fp32, as in transformers). Routed
    experts are read layer by layer into one host buffer each (pinned when `compute_device` is CUDA) and become
    `HostExperts` modules placed by `placements_fn(expert_module_names) -> {name: ExpertPlacement}`; the engine is
    `kllama.experts.install.wire_engine`'s handle; `expert_dtype` (auto | bf16 | fp8 | int8 | int4) says how they
    are held (`kllama.model.checkpoint.expert_scheme`). With `placements_fn=None` the stock experts modules are kept and
    filled on `compute_device` in `dtype` (engine None): what `from_pretrained` would give, via the low-memory path
    (an fp8 checkpoint comes out dequantized). Every
    user-fixable problem (missing file, shard or tensor; config/weights mismatch) is a KllamaError naming it.
    """
    device = torch.device(compute_device)
    model_dir = source.path
    index = scan_checkpoint(model_dir)
    model = build_meta_model(source, dtype=dtype, attn_implementation=attn_implementation)
    if placements_fn is not None:
        family_of(model)  # an unsupported family fails here, before any weight is read
        if not index.expert_layers:
            raise KllamaError(f"{model_dir} has no routed experts (a dense model); set use_kt: false to load it with "
                              f"stock transformers")
    experts = _expert_modules_by_layer(model, index)
    plan, _ = _plan_non_expert(model, index, [name for name, _ in experts.values()])
    total = sum(index.tensors[key].nbytes for _, key in plan) + sum(index.expert_layers[i].nbytes() for i in experts)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show_progress) as bar:
        _load_non_expert(model, index, plan, device, dtype, bar)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        _init_non_persistent_buffers(model, device)
        placements = dict(placements_fn([name for name, _ in experts.values()])) if placements_fn else {}
        host_modules: dict[str, nn.Module] = {}
        with ShardReader(index) as reader:
            for layer, (name, stock) in experts.items():
                held = expert_dtype if placements_fn is not None else "bf16"  # stock modules: dense
                gate_up, down = load_expert_layer(index, layer, dtype=dtype, pin=device.type == "cuda", reader=reader,
                                                  expert_dtype=held)
                if placements_fn is None:
                    stock.gate_up_proj = nn.Parameter(gate_up.to(device))  # [E, 2I, H]
                    stock.down_proj = nn.Parameter(down.to(device))  # [E, H, I]
                else:
                    host_modules[name] = _host_experts(gate_up, down, stock, placements, name, device)
                    model.set_submodule(name, host_modules[name])
                bar.update(index.expert_layers[layer].nbytes())
    _check_nothing_meta(model, index)
    if index.scales and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # every fp8 weight was dequantized or went to the expert engine
    _attach_generation_config(model, Path(model_dir))
    model.eval()
    if placements_fn is None:
        return model, None
    return model, wire_engine(model, host_modules)


def _host_experts(gate_up: torch.Tensor, down: torch.Tensor, stock: nn.Module,
                  placements: Mapping[str, ExpertPlacement], name: str, device: torch.device) -> nn.Module:
    from kllama.experts.module import HostExperts  # the engine's module; imported late to keep loading light

    if name not in placements:
        raise KllamaError(f"no expert placement for {name}; the rule file or expert_placement must cover every "
                          f"MoE layer (add a default)")
    return HostExperts(gate_up, down, stock.act_fn, placements[name], name, compute_device=device)


def _attach_generation_config(model: PreTrainedModel, model_dir: Path) -> None:
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
