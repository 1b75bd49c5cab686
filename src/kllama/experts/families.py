"""Which transformers modules hold a family's routed experts, and how to find them in a loaded model.

transformers 5.x stores every supported family's routed experts the same way: one module per MoE layer, decorated
with `@use_experts_implementation` (defaults: concatenated `[gate; up]`, not transposed, no bias, gated), holding
`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` and computing `down(act(gate(x)) * up(x))` weighted by the router.
The table below records what differs per family (only the class name and where it sits), so adding a family that
follows the same layout is one row.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from kllama.errors import KllamaError


@dataclass(frozen=True)
class FamilySpec:
    """How one model family stores its routed experts.

    `module_pattern` is a regex searched (anchored at the end) in qualified module names; its first group is the
    layer index, used to order the layers for streaming. `gate_up_order` records the split of `gate_up_proj`'s rows:
    `gate_up` = first half gate, second half up (transformers' `_default_apply_gate`). `shared_after` names the MoE
    block's shared-experts attribute when the block calls it after the routed experts, on the block's own input
    (DeepSeek): a routed pass on the CPU then computes it on the GPU meanwhile (`shared_overlap.py`).
    """

    model_type: str
    experts_class: str
    module_pattern: str = r"layers\.(\d+)\.mlp\.experts"
    gate_up_order: str = "gate_up"
    top_k_attr: str = "num_experts_per_tok"
    shared_after: str = ""


FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec("deepseek_v2", "DeepseekV2Experts", shared_after="shared_experts"),
        FamilySpec("deepseek_v3", "DeepseekV3Experts", shared_after="shared_experts"),
        FamilySpec("qwen2_moe", "Qwen2MoeExperts"),
        FamilySpec("qwen3_moe", "Qwen3MoeExperts"),
        FamilySpec("mixtral", "MixtralExperts"),
        FamilySpec("olmoe", "OlmoeExperts"),
    )
}


def family_of(model: nn.Module) -> FamilySpec:
    """The FamilySpec of `model` (read from `model.config.model_type`); KllamaError for unsupported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise KllamaError(
            f"the expert engine does not support model_type {model_type!r}; supported families: "
            f"{', '.join(sorted(FAMILIES))}. Set use_kt: false to train this model with stock transformers."
        )
    return FAMILIES[model_type]


def layer_index(name: str, spec: FamilySpec) -> int:
    """The decoder-layer index encoded in a routed-experts module's qualified name."""
    match = re.search(spec.module_pattern + "$", name)
    if match is None:
        raise ValueError(f"{name!r} is not a routed-experts module path of {spec.model_type}")
    return int(match.group(1))


def find_expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> stock routed-experts module of `model`, in layer order.

    Works on a bare transformers model or one wrapped (e.g. by PEFT): names keep whatever prefix the wrapper adds.
    Raises KllamaError for unsupported families or when no experts module is found (e.g. already replaced).
    """
    spec = family_of(model)
    pattern = re.compile(spec.module_pattern + "$")
    found = {
        name: module
        for name, module in model.named_modules()
        if type(module).__name__ == spec.experts_class and pattern.search(name)
    }
    if not found:
        raise KllamaError(
            f"no {spec.experts_class} modules found in this {spec.model_type} model; was the expert engine "
            "already installed, or is this a checkpoint with a different layout?"
        )
    return dict(sorted(found.items(), key=lambda item: layer_index(item[0], spec)))
