"""The weight deltas of saved PEFT LoRA adapters, per checkpoint tensor, for a merge that never builds the model.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module path>[.base_layer]*.lora_{A,B}.weight`. Two kinds of target are read:

* a linear weight (PEFT `target_modules`, or `target_parameters` on a linear's `.weight`): `A [r, in]`,
  `B [out, r]`, delta = scaling * B @ A on the checkpoint tensor that loads into `<module path>.weight`;
* a routed-experts module (PEFT 0.21 `target_parameters` on transformers 5's fused `gate_up_proj [E, 2I, H]` /
  `down_proj [E, H, I]`, layout in `kllama.experts.lora`): `A [E*r, in]`, `B [out, E*r]` read as `[out, r, E]`,
  delta_e = scaling * B_e @ A_e. Nested wrappers add `base_layer.` levels; which projection a pair belongs to is
  read from its shapes (gate_up: in H, out 2I; down: in I, out H), and its rank from A's rows (PEFT gives
  gate_up rank 2r when the adapter also named gate_proj/up_proj, see tests/infer/conftest.py::make_adapter).

scaling = alpha / r (alpha / sqrt(r) with `use_rslora`), with `rank_pattern` / `alpha_pattern` matched as PEFT
matches them. Anything else an adapter may carry (DoRA, trained biases, `modules_to_save`, other LoRA variants,
embedding LoRA, keys for modules the checkpoint does not hold) raises `CannotStream`: the caller merges in memory
with PEFT instead, which knows them, rather than writing wrong weights.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from torch import Tensor

from kllama.errors import KllamaError
from kllama.model.adapters import ADAPTER_WEIGHTS, read_adapter_config
from kllama.model.checkpoint import ExpertLayerKeys

PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<part>[AB])\.weight$")
# adapter_config.json fields that change nothing about the merged weights (which modules were targeted shows in the
# saved tensors themselves); every other field must keep PEFT's default for the streamed merge to be exact
_MERGE_NEUTRAL = frozenset({
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules", "target_parameters",
    "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "base_model_name_or_path",
    "revision", "task_type", "inference_mode", "peft_version", "auto_mapping", "peft_type", "megatron_core",
    "qalora_group_size", "ensure_weight_tying", "init_lora_weights", "runtime_config",
})
_PLAIN_INITS = (True, False, "gaussian")  # initialisations that leave the base weights alone


class CannotStream(Exception):
    """The streamed merge cannot produce exactly what PEFT's merge would; the message says why."""


def _peft_defaults() -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(LoraConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def unsupported_features(config: dict[str, Any]) -> list[str]:
    """The fields of an adapter_config.json that the streamed merge does not implement (DoRA, biases,
    modules_to_save, LoRA variants, non-LoRA adapters), as `name=value`; empty when it can merge the adapter."""
    if config.get("peft_type", "LORA") != "LORA":
        return [f"peft_type={config.get('peft_type')!r}"]
    defaults = _peft_defaults()
    found = []
    for name, value in sorted(config.items()):
        if name in _MERGE_NEUTRAL:
            continue
        default = defaults.get(name)
        if value != default and (value or default):  # None, {}, [] and False all mean "not used"
            found.append(f"{name}={value!r}")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        found.append(f"init_lora_weights={config['init_lora_weights']!r}")
    return found


@dataclass(frozen=True)
class Factors:
    """One target's LoRA in one adapter: where A and B are stored, the rank and the scaling."""

    adapter: Path
    key_a: str
    key_b: str
    rank: int
    scaling: float
    num_experts: int = 0  # 0: a linear weight; else routed experts `[E*r, in]` / `[out, E*r]`


class AdapterFactors:
    """Every LoRA target of a stack of adapters, by checkpoint tensor (linear) or expert layer, read lazily.

    `linear[ckpt_key]` and `experts[(layer, "gate_up_proj" | "down_proj")]` list the Factors of each adapter that
    adapts that weight, in adapter order. Factors are read from the adapter files when first needed and the last few
    kept (fp32; experts as `A [E, r, in]`, `B [E, out, r]`), so an expert layer's are decoded once, not per expert
    (DeepSeek-V3 at rank 16: about 0.35 GB per adapter).
    """

    def __init__(self, adapters: list[Path], weights: dict[str, tuple[str, tuple[int, ...]]],
                 expert_modules: dict[str, ExpertLayerKeys]) -> None:
        """`weights`: model weight key -> (checkpoint key, shape); `expert_modules`: module path -> its layer."""
        self.linear: dict[str, list[Factors]] = {}
        self.experts: dict[tuple[int, str], list[Factors]] = {}
        self._cache: OrderedDict[Factors, tuple[Tensor, Tensor]] = OrderedDict()
        # one expert layer's gate_up and down factors of every adapter stay decoded while its experts are merged
        # (per-expert checkpoints interleave down / gate / up of each expert), plus a linear target's
        self._capacity = 2 * len(adapters) + 2
        for adapter in adapters:
            self._add(adapter, weights, expert_modules)

    def _add(self, adapter: Path, weights: dict[str, tuple[str, tuple[int, ...]]],
             expert_modules: dict[str, ExpertLayerKeys]) -> None:
        config = read_adapter_config(adapter)
        unsupported = unsupported_features(config)
        if unsupported:
            raise CannotStream(f"adapter {adapter} uses {', '.join(unsupported)}")
        pairs: dict[tuple[str, str], dict[str, tuple[str, tuple[int, ...]]]] = {}
        for key, shape in _tensor_shapes(adapter).items():
            m = PEFT_KEY.match(key)
            if m is None:
                raise CannotStream(f"adapter {adapter} holds {key}, which is not a LoRA A/B weight")
            pairs.setdefault((m["path"], m["nest"]), {})[m["part"]] = (key, shape)
        for (path, nest), pair in sorted(pairs.items()):
            if set(pair) != {"A", "B"}:
                raise CannotStream(f"adapter {adapter}: {path} has lora_{next(iter(pair))} without its pair")
            (key_a, a), (key_b, b) = pair["A"], pair["B"]
            if path in expert_modules:
                layer = expert_modules[path]
                param = _expert_param(layer, a, b, path)
                rank = a[0] // layer.num_experts
                factors = Factors(adapter, key_a, key_b, rank, _scaling(config, rank, f"{path}.{param}"),
                                  layer.num_experts)
                self.experts.setdefault((layer.layer, param), []).append(factors)
                continue
            target = weights.get(f"{path}.weight")
            if target is None or nest:
                raise CannotStream(f"adapter {adapter} adapts {path}, which has no weight of that name in the "
                                   f"checkpoint")
            ckpt_key, shape = target
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or (b[0], a[1]) != tuple(shape):
                raise KllamaError(f"adapter {adapter}: {path} has lora_A {list(a)} / lora_B {list(b)}, which do not "
                                  f"fit its weight {list(shape)}; the adapter belongs to another model")
            factors = Factors(adapter, key_a, key_b, a[0], _scaling(config, a[0], path, f"{path}.weight"))
            self.linear.setdefault(ckpt_key, []).append(factors)

    def factors(self, f: Factors) -> tuple[Tensor, Tensor]:
        """`(A, B)` of `f` in fp32: linear `[r, in]`, `[out, r]`; experts `[E, r, in]`, `[E, out, r]`."""
        if f in self._cache:
            self._cache.move_to_end(f)
            return self._cache[f]
        with safe_open(str(f.adapter / ADAPTER_WEIGHTS), framework="pt") as handle:
            a, b = handle.get_tensor(f.key_a).float(), handle.get_tensor(f.key_b).float()
        if f.num_experts:
            e = f.num_experts
            a = a.reshape(e, f.rank, a.shape[-1])  # [E, r, in]: expert e = rows e*r:(e+1)*r
            b = b.reshape(b.shape[0], f.rank, e).permute(2, 0, 1).contiguous()  # [E, out, r]: columns e, e+E, ...
        self._cache[f] = (a, b)
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return a, b

    def linear_delta(self, f: Factors) -> Tensor:
        """fp32 `scaling * B @ A` of a linear target: `[out, in]`."""
        a, b = self.factors(f)
        return (b @ a).mul_(f.scaling)

    def expert_delta(self, f: Factors, expert: int, rows: slice = slice(None)) -> Tensor:
        """fp32 `scaling * B_e @ A_e` of one expert, only the output `rows` asked for (gate or up of gate_up)."""
        a, b = self.factors(f)
        return (b[expert, rows] @ a[expert]).mul_(f.scaling)


def _tensor_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    path = adapter / ADAPTER_WEIGHTS
    if not path.is_file():
        raise KllamaError(f"adapter {str(adapter)!r} has no {ADAPTER_WEIGHTS}; give a directory written by kllama "
                          f"train or PEFT")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise KllamaError(f"{path} is incomplete or corrupt ({exc}); train or download the adapter again") from None


def _expert_param(layer: ExpertLayerKeys, a: tuple[int, ...], b: tuple[int, ...], path: str) -> str:
    # which fused projection a factor pair adapts, from its shapes: gate_up in H / out 2I, down in I / out H
    by_shape = {(layer.hidden, 2 * layer.intermediate): "gate_up_proj", (layer.intermediate, layer.hidden): "down_proj"}
    param = by_shape.get((a[-1], b[0])) if len(a) == len(b) == 2 else None
    if param is None or a[0] % layer.num_experts or b[1] != a[0]:
        raise KllamaError(f"{path}: expert LoRA A {list(a)} / B {list(b)} fits neither gate_up_proj "
                          f"[{layer.num_experts}, {2 * layer.intermediate}, {layer.hidden}] nor down_proj "
                          f"[{layer.num_experts}, {layer.hidden}, {layer.intermediate}]; the adapter belongs to "
                          f"another model")
    return param


def _scaling(config: dict[str, Any], rank: int, *names: str) -> float:
    """PEFT's scaling of the target called `names[0]` (or `names[1]`...), with the rank the tensors have."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    configured, alpha = int(config["r"]), float(config["lora_alpha"])
    for name in reversed(names):  # the first name a pattern matches wins
        if (key := get_pattern_key(list(rank_pattern), name)) in rank_pattern:
            configured = int(rank_pattern[key])
        if (key := get_pattern_key(list(alpha_pattern), name)) in alpha_pattern:
            alpha = float(alpha_pattern[key])
    if configured != rank:
        raise CannotStream(f"{names[0]} has rank {rank} in the adapter's tensors but {configured} in its "
                           f"adapter_config.json")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
