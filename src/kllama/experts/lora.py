"""Per-expert LoRA on the routed experts, stored exactly like PEFT 0.21's `target_parameters` adapters.

PEFT's `ParamWrapper` on a fused `[E, out, in]` expert parameter (transformers' layout, not transposed) keeps
`lora_A.weight [E*r, in]` (expert e = rows `e*r:(e+1)*r`) and `lora_B.weight [out, E*r]` read as `[out, r, E]`
(expert e = columns `e, e+E, ...`), with delta_e = (alpha / r) * B_e @ A_e. For `gate_up_proj` in = H, out = 2I;
for `down_proj` in = I, out = H. Targeting several parameters of one module nests the wrappers
in the module's parameter order (gate_up_proj inside down_proj, whatever order `target_parameters` lists), so the
saved keys are `base_model.model.<path>.experts.base_layer.lora_{A,B}.weight` (gate_up, inner) and
`base_model.model.<path>.experts.lora_{A,B}.weight` (down, outer). Using the same tensors and names makes our
expert adapters loadable by `PeftModel.from_pretrained` on the stock model, and PEFT's loadable by us.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from kllama.errors import KllamaError
from kllama.experts.module import HostExperts

EXPERT_TARGETS: tuple[str, ...] = ("gate_up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class ExpertLoRA(nn.Module):
    """LoRA factors of one fused expert projection, in PEFT's layout: `lora_A [E*r, in]`, `lora_B [out, E*r]`."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, alpha: float,
                 *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts, self.r, self.alpha = num_experts, r, alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.zeros(num_experts * r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * r, device=device, dtype=dtype))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A like `nn.Linear` (kaiming-uniform, a=sqrt(5)), B zeros, so the delta starts at 0."""
        with torch.no_grad():
            a = torch.empty(self.lora_A.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, r={self.r}, alpha={self.alpha}, A={tuple(self.lora_A.shape)}"


def _shapes(module: HostExperts) -> dict[str, tuple[int, int]]:
    # (in_features, out_features) of each fused projection as PEFT sees it
    return {
        "gate_up_proj": (module.hidden_dim, 2 * module.intermediate_dim),
        "down_proj": (module.intermediate_dim, module.hidden_dim),
    }


def _peft_path(name: str) -> str:
    # keys are relative to the bare transformers model; a PEFT wrapper's own prefix is dropped first
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _key_prefixes(name: str, targets: Sequence[str]) -> dict[str, str]:
    # PEFT nests the wrappers in the experts module's parameter order (gate_up_proj, then down_proj), whatever the
    # order of target_parameters: the last one is outermost, each earlier one sits one `base_layer` deeper
    ordered = [t for t in EXPERT_TARGETS if t in targets]
    base = PEFT_PREFIX + _peft_path(name)
    return {t: base + "." + "base_layer." * (len(ordered) - 1 - i) for i, t in enumerate(ordered)}


class ExpertLoraSet:
    """The routed-expert LoRA of one model on the expert engine: add it, save and load it under PEFT's keys, and
    switch it off. Built over every HostExperts of the model (with or without a PEFT wrapper around it)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: dict[str, HostExperts] = {n: m for n, m in model.named_modules() if isinstance(m, HostExperts)}
        if not self.modules:
            raise KllamaError("expert LoRA needs the expert engine installed first (use_kt: true)")

    @classmethod
    def of(cls, model: nn.Module) -> "ExpertLoraSet | None":
        """The set of `model`, or None when its routed experts are not on the expert engine."""
        return cls(model) if any(isinstance(m, HostExperts) for m in model.modules()) else None

    @property
    def added(self) -> bool:
        """True once expert LoRA has been added to the layers."""
        return any(len(m.lora) for m in self.modules.values())

    def add(self, r: int, alpha: float, dropout: float = 0.0, targets: Sequence[str] = EXPERT_TARGETS, *,
            seed: int = 0, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
        """Add trainable per-expert LoRA (rank `r`, scaling `alpha/r`) to every HostExperts and return the new
        parameters. They live on each module's compute device in `dtype` (fp32 by default, like PEFT's
        `autocast_adapter_dtype`); A is drawn from a generator seeded with `seed`, B is zero. `dropout` must be 0:
        dropout cannot be applied to a fused expert weight (PEFT's `target_parameters` refuses it too)."""
        if dropout:
            raise KllamaError(f"expert LoRA does not support lora_dropout={dropout} (PEFT's target_parameters "
                              "cannot either); set lora_dropout: 0")
        unknown = [t for t in targets if t not in EXPERT_TARGETS]
        if unknown or not targets:
            raise KllamaError(f"unknown expert LoRA targets {unknown or list(targets)}; choose from {EXPERT_TARGETS}")
        if r <= 0:
            raise KllamaError(f"lora_rank must be a positive integer, got {r}")
        generator = torch.Generator().manual_seed(seed)
        params: list[nn.Parameter] = []
        for module in self.modules.values():
            if len(module.lora):
                raise KllamaError(f"{module.name} already has expert LoRA; load or replace it instead of adding twice")
            for target in targets:
                in_f, out_f = _shapes(module)[target]
                lora = ExpertLoRA(module.num_experts, in_f, out_f, r, alpha, device=module.compute_device, dtype=dtype)
                lora.reset_parameters(generator)
                module.lora[target] = lora
                params += [lora.lora_A, lora.lora_B]
        return params

    def state_dict(self) -> dict[str, Tensor]:
        """The expert LoRA tensors under the exact keys `peft.get_peft_model_state_dict` writes for a stock model
        adapted with `target_parameters=["mlp.experts.<target>", ...]` (CPU copies)."""
        state: dict[str, Tensor] = {}
        for name, module in self.modules.items():
            prefixes = _key_prefixes(name, list(module.lora.keys()))
            for target, lora in module.lora.items():
                state[prefixes[target] + "lora_A.weight"] = lora.lora_A.detach().cpu().clone()
                state[prefixes[target] + "lora_B.weight"] = lora.lora_B.detach().cpu().clone()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy expert LoRA tensors in PEFT's key layout (as `state_dict` or PEFT write them) into the LoRA added
        with `add` (same targets). Keys that are not expert LoRA are ignored; a missing or mis-shaped expert key
        raises KllamaError listing every problem."""
        problems: list[str] = []
        for name, module in self.modules.items():
            if not len(module.lora):
                raise KllamaError(f"{module.name} has no expert LoRA; add it before loading an adapter into it")
            prefixes = _key_prefixes(name, list(module.lora.keys()))
            for target, lora in module.lora.items():
                for part, param in (("lora_A", lora.lora_A), ("lora_B", lora.lora_B)):
                    key = prefixes[target] + part + ".weight"
                    tensor = state_dict.get(key)
                    if tensor is None:
                        problems.append(f"missing {key}")
                    elif tuple(tensor.shape) != tuple(param.shape):
                        problems.append(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                    else:
                        with torch.no_grad():
                            param.copy_(tensor)
        if problems:
            raise KllamaError(
                "the adapter's expert LoRA does not match this model (check lora_rank and the expert targets):\n  "
                + "\n  ".join(problems)
            )

    def set_enabled(self, enabled: bool) -> None:
        """Turn expert LoRA on or off in every layer (off = the frozen base experts)."""
        for module in self.modules.values():
            module.lora_enabled = enabled

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the block with expert LoRA off (e.g. the DPO reference pass), restoring each layer's previous state."""
        before = {name: m.lora_enabled for name, m in self.modules.items()}
        self.set_enabled(False)
        try:
            yield
        finally:
            for name, module in self.modules.items():
                module.lora_enabled = before[name]
