"""LLaMA-Factory's KTransformers keys (`KTransformersArguments` and its `kt_config` mapping): which ones kllama maps,
which it accepts without effect (and why), and the CPU thread count an engine actually gets.

LLaMA-Factory's current KTransformers examples drive KTransformers' own AMX kernels; kllama runs its bf16 expert
engine instead, so most of these keys describe machinery kllama does not have. They are accepted, so the YAMLs run
unchanged, and each given one is named once at start (`accepted, no effect in kllama: <key> (<why>)`).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kllama.config.loader import KllamaConfig

_FROM_MODEL_DIR = ("kllama reads the routed experts from model_name_or_path and quantizes them at load "
                   "(expert_dtype: int8 | int4 | fp8)")
_LORA_EXPERTS = ("extra GPU-side LoRA experts are not implemented; kllama puts LoRA on the routed experts "
                 "themselves (lora_target)")

# top-level key -> why it has no effect in kllama
TOP_LEVEL_NO_EFFECT: dict[str, str] = {
    "kt_weight_path": f"pre-quantised INT8 expert files; {_FROM_MODEL_DIR}",
    "kt_non_expert_weight_path": f"a BF16 non-expert cache for INT8 experts; {_FROM_MODEL_DIR}",
    "kt_expert_checkpoint_path": f"online expert conversion; {_FROM_MODEL_DIR}",
    "kt_use_lora_experts": _LORA_EXPERTS,
    "kt_lora_expert_num": _LORA_EXPERTS,
    "kt_lora_expert_intermediate_size": _LORA_EXPERTS,
}

# kt_config key -> why it has no effect in kllama (None: mapped, see `cpu_threads`)
KT_CONFIG_KEYS: dict[str, str | None] = {
    "kt_num_threads": None,
    "kt_expert_weight_format": "kllama holds routed experts as expert_dtype says (bf16 | int8 | int4 | fp8); set "
                               "the format there",
    "kt_backend": "KTransformers' AMX/AVX-512 kernels; kllama computes experts in bf16 torch (oneDNN uses AMX "
                  "where the CPU has it)",
    "kt_tp_enabled": "KTransformers' tensor parallelism across NUMA nodes; kllama runs one CPU thread pool",
    "kt_threadpool_count": "kllama runs one CPU thread pool of cpu_infer threads",
    "kt_max_cache_depth": "KTransformers' CPU activation cache; kllama keeps expert activations in autograd",
    "kt_weight_lifecycle": "kllama keeps the routed experts in host RAM for the whole run",
    "kt_share_backward_bb": "a KTransformers kernel buffer option",
    "kt_num_gpu_experts": "kllama places whole layers (expert_placement, max_gpu_memory), not single experts",
    "kt_force_fused_expert_lora": "kllama's expert LoRA is always one fused set per layer (PEFT's layout)",
    "kt_model_max_length": "a KTransformers kernel capacity; kllama sizes each pass from its batch",
}
WEIGHT_FORMATS: tuple[str, ...] = ("bf16", "int8", "int4", "fp8")  # accepted values of kt_expert_weight_format


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _kt_config(config: "KllamaConfig") -> dict[str, Any]:
    return dict(config.engine.kt_config or {})


def kt_problems(config: "KllamaConfig") -> list[str]:
    """What is wrong with the KTransformers keys of `config` (cross-field checks, each with its fix)."""
    out: list[str] = []
    e, kt = config.engine, _kt_config(config)
    unknown = sorted(set(kt) - set(KT_CONFIG_KEYS))
    if unknown:
        out.append(f"kt_config: unknown key(s) {', '.join(unknown)}; LLaMA-Factory's kt_config takes "
                   f"{', '.join(KT_CONFIG_KEYS)}")
    fmt = kt.get("kt_expert_weight_format")
    if fmt is not None and str(fmt).strip().lower() not in WEIGHT_FORMATS:
        out.append(f"kt_config.kt_expert_weight_format: {fmt!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    threads = kt.get("kt_num_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        out.append(f"kt_config.kt_num_threads: must be an integer >= 1, got {threads!r}")
    if e.kt_cpu_activation is not None and not e.use_kt:
        out.append("kt_cpu_activation: only used with use_kt: true; set use_kt: true or remove it")
    if e.kt_cpu_activation == "recompute" and not config.training.gradient_checkpointing:
        out.append("kt_cpu_activation: recompute needs gradient checkpointing; remove "
                   "disable_gradient_checkpointing: true or use kt_cpu_activation: retain")
    return out


def cpu_threads(config: "KllamaConfig") -> tuple[int | None, list[str]]:
    """The CPU threads expert compute gets (`cpu_infer`, else `kt_config.kt_num_threads`, else None = the
    default), clamped to the CPUs this process may use, and the lines saying what was decided."""
    lines: list[str] = []
    requested, key = config.engine.cpu_infer, "cpu_infer"
    kt_threads = _kt_config(config).get("kt_num_threads")
    if requested is None and kt_threads is not None:
        requested, key = int(kt_threads), "kt_config.kt_num_threads"
        lines.append(f"kt_config.kt_num_threads: {requested} CPU threads for expert compute (as cpu_infer)")
    elif requested is not None and kt_threads is not None and int(kt_threads) != requested:
        lines.append(f"kt_config.kt_num_threads: {kt_threads} ignored, cpu_infer {requested} decides")
    available = usable_cpus()
    if requested is not None and requested > available:
        lines.append(f"{key}: {requested} threads asked, this process may use {available} CPUs; using {available}")
        requested = available
    return requested, lines


def _activation_note(config: "KllamaConfig") -> tuple[str, str] | None:
    # kllama's expert pass saves its activations through autograd: gradient checkpointing alone decides whether
    # they are recomputed, so `retain` under checkpointing is the one combination it cannot honour.
    if config.engine.kt_cpu_activation == "retain" and config.training.gradient_checkpointing:
        return ("kt_cpu_activation", "kllama recomputes expert activations with the rest of the layer under "
                "gradient checkpointing; disable_gradient_checkpointing: true keeps them")
    return None


def engine_notices(config: "KllamaConfig") -> list[str]:
    """The start-up lines about KTransformers keys: thread count decisions and each given key without effect."""
    _, lines = cpu_threads(config)
    kt = _kt_config(config)
    ignored: list[tuple[str, str]] = [(k, why) for k, why in TOP_LEVEL_NO_EFFECT.items() if k in config.given]
    activation = _activation_note(config)
    if activation is not None:
        ignored.append(activation)
    for key, value in kt.items():
        why = KT_CONFIG_KEYS.get(key)
        if why is None or (key == "kt_expert_weight_format" and str(value).strip().lower() == "bf16"):
            continue
        ignored.append((f"kt_config.{key}", why))
    lines += [f"accepted, no effect in kllama: {key} ({why})" for key, why in ignored]
    return lines
