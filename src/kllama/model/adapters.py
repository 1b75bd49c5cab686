"""LoRA adapters on stock and expert-engine models, saved in PEFT's format so stock tools load them.

Linear layers get PEFT LoRA through `target_modules`, except on MoE models the dense-MLP and shared-expert linears
named like routed experts (`gate_proj`/`up_proj`/`down_proj`, `w1`/`w2`/`w3`), which PEFT would rewrite to the
routed experts: those get LoRA through `target_parameters` on their `.weight` (same saved tensors). Routed experts get
per-expert LoRA: through PEFT's `target_parameters` on a stock model, or through the expert engine's own LoRA (same
tensor layout and key names) when the experts live in host RAM. Either way the saved adapter is one
`adapter_model.safetensors` + `adapter_config.json` that `PeftModel.from_pretrained` reads on the stock model.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kllama.compat import peft_wrapped
from kllama.errors import KllamaError
from kllama.experts.lora import ExpertLoraSet

logger = logging.getLogger(__name__)

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
TEMPLATE_RECORD = "template.json"  # written by `kllama train` next to the adapter: the chat template it trained with
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_NEVER_TARGET = ("lm_head",)
# On MoE models, PEFT (>= 0.19 with transformers 5) rewrites these leaf names in `target_modules` to the fused
# routed-expert parameters when it builds or loads an adapter (whatever their parent module). So on MoE models these
# names mean the routed experts, and a shared expert's or dense layer's `gate_proj` is targeted through
# `target_parameters` on its weight (`...shared_experts.gate_proj.weight`), which PEFT leaves alone and saves under
# the same `...gate_proj.lora_A.weight` / `lora_B.weight` keys a linear LoRA has.
_EXPERT_ALIASES = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoraSpec:
    """What to put LoRA on: linear leaf names, whether routed experts get LoRA, the hyper-parameters, and linear
    weights targeted as parameters (PEFT `target_parameters` suffixes such as `shared_experts.gate_proj.weight`)."""

    linear_targets: tuple[str, ...]
    experts: bool
    rank: int
    alpha: int
    dropout: float
    linear_weights: tuple[str, ...] = ()


def _linear_leaf_names(model: nn.Module) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(part in _NEVER_TARGET for part in name.split(".")):
            names.add(name.split(".")[-1])
    return names


def _aliased_linear_weights(model: nn.Module) -> tuple[str, ...]:
    """`target_parameters` suffixes (`<parent>.<leaf>.weight`) of the linear layers whose leaf name PEFT reserves for
    routed experts on MoE models: dense MLP layers and shared experts."""
    suffixes = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and parts[-1] in _EXPERT_ALIASES and not set(parts) & set(_NEVER_TARGET):
            suffixes.add(".".join([*parts[-2:], "weight"]))
    return tuple(sorted(suffixes))


def _expert_lora(model: nn.Module) -> ExpertLoraSet | None:
    """The expert engine's LoRA of `model`, or None when its routed experts are stock modules (PEFT handles them)."""
    return ExpertLoraSet.of(model)


def _expert_parents(model: nn.Module) -> list[str]:
    """Qualified names of modules that hold fused routed experts (stock `gate_up_proj`/`down_proj`) or the engine's
    host experts."""
    engine_lora = _expert_lora(model)
    hosts = set(engine_lora.modules) if engine_lora is not None else set()
    out = []
    for name, module in model.named_modules():
        if name in hosts or all(
            isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3 for p in EXPERT_PARAMS
        ):
            out.append(name)
    return out


def resolve_lora_spec(model: nn.Module, lora_target: list[str], rank: int, alpha: int | None,
                      dropout: float) -> LoraSpec:
    """Turn LLaMA-Factory's `lora_target` (`all` or names; `experts` = routed experts) into a LoraSpec for `model`.

    `all` is every linear layer but `lm_head` plus the routed experts; on MoE models that includes the dense-MLP and
    shared-expert linears (as LLaMA-Factory trains them), targeted through their weights (see `_EXPERT_ALIASES`)."""
    has_experts = bool(_expert_parents(model))
    expert_names = ("experts", *EXPERT_PARAMS, *(_EXPERT_ALIASES if has_experts else ()))
    available = _linear_leaf_names(model) - (set(_EXPERT_ALIASES) if has_experts else set())
    wanted = [t.strip() for t in lora_target if t.strip()]
    weights: tuple[str, ...] = ()
    if wanted == ["all"]:
        linear, experts = tuple(sorted(available)), has_experts
        weights = _aliased_linear_weights(model) if has_experts else ()
    else:
        experts = any(t in expert_names for t in wanted)
        linear_names = [t for t in wanted if t not in expert_names]
        unknown = [t for t in linear_names if t not in available]
        if unknown or (experts and not has_experts):
            valid = ", ".join(sorted(available) + (["experts"] if has_experts else []))
            bad = ", ".join(unknown + (["experts"] if experts and not has_experts else []))
            raise KllamaError(f"lora_target: {bad} not found in this model; use `all` or some of: {valid}")
        linear = tuple(linear_names)
    if not linear and not experts:
        raise KllamaError("lora_target: selects no module; use `all` or name linear layers / experts")
    if weights and dropout:
        raise KllamaError(f"lora_dropout: {dropout} cannot apply to the dense-MLP / shared-expert LoRA of this MoE "
                          "model (PEFT's target_parameters have no dropout, as for routed experts); set lora_dropout: 0")
    return LoraSpec(linear, experts, rank, alpha if alpha is not None else 2 * rank, dropout, weights)


def _expert_target_parameters(model: nn.Module) -> list[str]:
    """PEFT `target_parameters` naming the routed experts (stock fused experts or the engine's HostExperts)."""
    parents = _expert_parents(model)
    # PEFT matches target_parameters by suffix, e.g. "mlp.experts.gate_up_proj".
    suffixes = sorted({".".join(p.split(".")[-2:]) for p in parents})
    return [f"{s}.{param}" for s in suffixes for param in EXPERT_PARAMS]


def attach_lora(model: nn.Module, spec: LoraSpec, *, seed: int = 0) -> PeftModel:
    """Wrap `model` in a PeftModel with trainable LoRA as `spec` says (expert LoRA included)."""
    torch.manual_seed(seed)
    engine_lora = _expert_lora(model)
    experts = _expert_target_parameters(model) if spec.experts and engine_lora is None else []
    target_parameters = [*spec.linear_weights, *experts] or None
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.linear_targets) or None, target_parameters=target_parameters,
        task_type="CAUSAL_LM", bias="none",
    )
    if not spec.linear_targets and target_parameters is None:
        # Experts only on the engine: PEFT still needs some target to build a PeftModel; an empty regex works.
        config.target_modules = r"^$"
    peft_model = peft_wrapped(partial(get_peft_model, model, config))
    if spec.experts and engine_lora is not None:
        # the same HostExperts modules; their PEFT key names do not depend on the wrapper's prefix
        engine_lora.add(r=spec.rank, alpha=spec.alpha, dropout=spec.dropout, seed=seed)
        # Record the PEFT-equivalent target so the saved adapter loads on the stock model.
        config.target_parameters = [*spec.linear_weights, *_expert_target_parameters(peft_model)]
    return peft_model


def adapter_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """Every adapter tensor under PEFT's saved key names (linear LoRA + expert LoRA)."""
    engine_lora = _expert_lora(model)
    state = {k: v for k, v in get_peft_model_state_dict(model).items() if not (engine_lora and ".experts." in k)}
    if engine_lora is not None:
        state.update(engine_lora.state_dict())
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(model: PeftModel, out_dir: str | Path) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` into `out_dir` (each file atomically). An adapter
    holding NaN or inf is refused (KllamaError): it would only poison whatever loads it."""
    out = Path(out_dir)
    state = adapter_state_dict(model)
    bad = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise KllamaError(f"refusing to write the adapter to {str(out)!r}: {len(bad)} of {len(state)} tensors hold NaN "
                          f"or inf (e.g. {bad[0]}); the training diverged: lower learning_rate, or resume from an "
                          "earlier checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    config = model.peft_config["default"].to_dict()
    config["base_model_name_or_path"] = getattr(model.get_base_model().config, "_name_or_path", None)
    for key, value in list(config.items()):
        if isinstance(value, set):
            config[key] = sorted(value)
    tmp_cfg = out / (ADAPTER_CONFIG + ".tmp")
    tmp_cfg.write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    os.replace(tmp_cfg, out / ADAPTER_CONFIG)
    return out


def load_adapter_weights(model: PeftModel, adapter_dir: str | Path) -> None:
    """Load a saved adapter's tensors into an already-built PeftModel with the same targets."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise KllamaError(f"adapter {str(adapter_dir)!r} has no {ADAPTER_WEIGHTS}; give a directory written by kllama train or PEFT")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise KllamaError(f"{path} is incomplete or corrupt ({exc}); train or download the adapter again") from None
    engine_lora = _expert_lora(model)
    expert_state = {k: v for k, v in state.items() if ".experts." in k}
    if engine_lora is not None and (engine_lora.added or expert_state):  # an attention-only adapter has neither
        engine_lora.load_state_dict(expert_state)
        state = {k: v for k, v in state.items() if ".experts." not in k}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise KllamaError(f"adapter {str(adapter_dir)!r} does not match this model ({len(missing)} tensors unused, e.g. {missing[0]})")


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter_config.json of `adapter_dir`, with a clear error when it is missing."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise KllamaError(f"adapter_name_or_path: {str(adapter_dir)!r} has no {ADAPTER_CONFIG}; give a LoRA adapter directory")
    return json.loads(path.read_text())


def spec_from_adapter(model: nn.Module, adapter_dir: str | Path) -> LoraSpec:
    """Rebuild the LoraSpec of a saved adapter (to continue training it)."""
    cfg = read_adapter_config(adapter_dir)
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [] if targets == r"^$" else [targets]
    parameters = cfg.get("target_parameters") or []
    weights = tuple(sorted(p for p in parameters if p.endswith(".weight")))  # linear weights; the rest are experts
    return LoraSpec(tuple(sorted(targets)), len(weights) < len(parameters), int(cfg["r"]), int(cfg["lora_alpha"]),
                    float(cfg.get("lora_dropout", 0.0)), weights)


def adapter_dirs(paths: list[str] | None) -> list[Path]:
    """`adapter_name_or_path` as directories, each checked to hold a PEFT adapter."""
    out = []
    for path in paths or []:
        read_adapter_config(path)
        out.append(Path(path))
    return out


def check_adapter_templates(template: str | None, adapters: list[Path]) -> list[str]:
    """Warn (and return the warnings) for each adapter trained with another chat template than `template`."""
    warnings = []
    for adapter in adapters:
        record = adapter / TEMPLATE_RECORD
        if not record.is_file():
            continue
        trained = json.loads(record.read_text(encoding="utf-8")).get("template")
        if trained and trained != template:
            msg = (f"adapter {str(adapter)!r} was trained with template {trained!r} but template {template!r} is "
                   f"requested; answers may degrade. Set template: {trained} to chat as it was trained")
            logger.warning(msg)
            warnings.append(msg)
    return warnings


def merge_adapters(model: nn.Module, adapters: list[Path]) -> nn.Module:
    """Load each PEFT adapter in order and merge it into the weights (expert LoRA on fused experts included)."""
    for adapter in adapters:
        try:
            model = peft_wrapped(partial(PeftModel.from_pretrained, model, str(adapter))).merge_and_unload()
        except (OSError, SafetensorError) as exc:
            raise KllamaError(f"{adapter / ADAPTER_WEIGHTS} is incomplete or corrupt ({exc}); train or download the "
                              f"adapter again") from None
        except (ValueError, KeyError, RuntimeError) as exc:
            raise KllamaError(f"adapter {str(adapter)!r} does not fit model {model.config.name_or_path!r}: {exc}") from None
    return model


def attach_saved_adapter(model: nn.Module, adapter_dir: Path) -> PeftModel:
    """`model` with the saved adapter attached unmerged (expert LoRA on the engine's host experts included)."""
    peft_model = attach_lora(model, spec_from_adapter(model, adapter_dir))
    load_adapter_weights(peft_model, adapter_dir)
    return peft_model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable adapter parameters by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def adapters_disabled(model: PeftModel) -> Iterator[None]:
    """Run the base model: PEFT LoRA and expert LoRA both off (the DPO reference when training from scratch)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(model.disable_adapter())
        engine_lora = _expert_lora(model)
        if engine_lora is not None:
            stack.enter_context(engine_lora.disabled())
        yield


@contextlib.contextmanager
def adapters_disabled_in(module: nn.Module) -> Iterator[None]:
    """Run `module` (a part of a PeftModel, e.g. one decoder layer) with its own PEFT LoRA and expert LoRA off, as
    `adapters_disabled` does for the whole model: PEFT's `enable_adapters` on each of its tuner layers that was on
    (it also toggles the adapters' requires_grad, as PEFT's `disable_adapter` does), restored on exit."""
    tuners = [m for m in module.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    with contextlib.ExitStack() as stack:
        engine_lora = ExpertLoraSet.of(module)
        if engine_lora is not None:
            stack.enter_context(engine_lora.disabled())
        for tuner in tuners:
            tuner.enable_adapters(False)
        try:
            yield
        finally:
            for tuner in tuners:
                tuner.enable_adapters(True)


@contextlib.contextmanager
def adapter_weights_swapped(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily load `snapshot` (name -> tensor) into the trainable parameters (the DPO reference when training
    continues from an existing adapter: the reference is the model with the starting adapter, frozen)."""
    params = lora_parameters(model)
    saved = {}
    with torch.no_grad():
        for name, tensor in snapshot.items():
            saved[name] = params[name].detach().clone()
            params[name].copy_(tensor)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)


def snapshot_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """A frozen copy of every trainable adapter tensor."""
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}
