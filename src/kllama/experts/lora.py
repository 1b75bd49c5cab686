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


def expert_modules(model: nn.Module) -> dict[str, HostExperts]:
    """Qualified name -> HostExperts of `model` (empty when the expert engine is not installed)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HostExperts)}


def add_expert_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] = EXPERT_TARGETS,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[nn.Parameter]:
    """Add trainable per-expert LoRA (rank `r`, scaling `alpha/r`) to every HostExperts of `model` and return the new
    parameters. They live on each module's compute device in `dtype` (fp32 by default, like PEFT's
    `autocast_adapter_dtype`); A is drawn from a generator seeded with `seed`, B is zero. `dropout` must be 0:
    dropout cannot be applied to a fused expert weight (PEFT's `target_parameters` refuses it too)."""
    if dropout:
        raise KllamaError(
            f"expert LoRA does not support lora_dropout={dropout} (PEFT's target_parameters cannot either); "
            "set lora_dropout: 0"
        )
    unknown = [t for t in targets if t not in EXPERT_TARGETS]
    if unknown or not targets:
        raise KllamaError(f"unknown expert LoRA targets {unknown or list(targets)}; choose from {EXPERT_TARGETS}")
    if r <= 0:
        raise KllamaError(f"lora_rank must be a positive integer, got {r}")
    modules = expert_modules(model)
    if not modules:
        raise KllamaError("add_expert_lora needs the expert engine installed first (install_expert_engine)")
    generator = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    for module in modules.values():
        if len(module.lora):
            raise KllamaError(f"{module.name} already has expert LoRA; load or replace it instead of adding twice")
        device = module.compute_device
        for target in targets:
            in_f, out_f = _shapes(module)[target]
            lora = ExpertLoRA(module.num_experts, in_f, out_f, r, alpha, device=device, dtype=dtype)
            lora.reset_parameters(generator)
            module.lora[target] = lora
            params += [lora.lora_A, lora.lora_B]
    return params


def _peft_path(name: str) -> str:
    # keys are relative to the bare transformers model; a PEFT wrapper's own prefix is dropped first
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _key_prefixes(name: str, targets: Sequence[str]) -> dict[str, str]:
    # PEFT nests the wrappers in the experts module's parameter order (gate_up_proj, then down_proj), whatever the
    # order of target_parameters: the last one is outermost, each earlier one sits one `base_layer` deeper
    ordered = [t for t in EXPERT_TARGETS if t in targets]
    base = PEFT_PREFIX + _peft_path(name)
    return {t: base + "." + "base_layer." * (len(ordered) - 1 - i) for i, t in enumerate(ordered)}


def expert_lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The expert LoRA tensors under the exact keys `peft.get_peft_model_state_dict` writes for a stock model adapted
    with `target_parameters=["mlp.experts.<target>", ...]` (CPU copies)."""
    state: dict[str, Tensor] = {}
    for name, module in expert_modules(model).items():
        prefixes = _key_prefixes(name, list(module.lora.keys()))
        for target, lora in module.lora.items():
            state[prefixes[target] + "lora_A.weight"] = lora.lora_A.detach().cpu().clone()
            state[prefixes[target] + "lora_B.weight"] = lora.lora_B.detach().cpu().clone()
    return state


def load_expert_lora(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy expert LoRA tensors in PEFT's key layout (as written by `expert_lora_state_dict` or PEFT) into the
    model's ExpertLoRA parameters (added with `add_expert_lora` using the same targets order). Keys that are not
    expert LoRA are ignored; a missing or mis-shaped expert key raises KllamaError."""
    problems: list[str] = []
    for name, module in expert_modules(model).items():
        if not len(module.lora):
            raise KllamaError(f"{module.name} has no expert LoRA; call add_expert_lora before load_expert_lora")
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


def set_expert_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn expert LoRA on or off for every HostExperts of `model` (off = the frozen base experts)."""
    for module in expert_modules(model).values():
        module.lora_enabled = enabled


@contextmanager
def expert_lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the block with expert LoRA off (e.g. the DPO reference pass), restoring each module's previous state."""
    modules = expert_modules(model).values()
    before = [m.lora_enabled for m in modules]
    set_expert_lora_enabled(model, False)
    try:
        yield
    finally:
        for module, enabled in zip(modules, before):
            module.lora_enabled = enabled
