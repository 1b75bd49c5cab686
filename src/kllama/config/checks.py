"""Cross-field checks: combinations of settings that cannot work together, each with the fix."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from kllama.config.kt_keys import kt_problems

if TYPE_CHECKING:
    from kllama.config.loader import KllamaConfig

REPO_ROOT = Path(__file__).resolve().parents[3]

# report_to value -> the package it needs ("none" and "tensorboard" come with kllama)
_REPORTERS: dict[str, str | None] = {
    "none": None,
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "swanlab": "swanlab",
    "trackio": "trackio",
}

# keys that only mean something for the preference stage
_DPO_ONLY = ("pref_loss", "pref_beta", "pref_ftx", "dpo_label_smoothing", "simpo_gamma", "discopop_tau", "ld_alpha",
             "precompute_ref_log_probs", "precompute_ref_batch_size", "prefix_sharing")


def resolve_config_path(path: str, config: "KllamaConfig") -> Path | None:
    """Find a file named in a config: as given (absolute or from the working directory), next to the config file,
    or inside the kllama source tree (for the shipped `examples/...` paths)."""
    candidates = [Path(path)]
    if config.source:
        candidates.append(Path(config.source).resolve().parent / path)
    candidates.append(REPO_ROOT / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _is_nonempty_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.iterdir())


def _train_checks(c: "KllamaConfig", check_paths: bool) -> list[str]:
    out: list[str] = []
    t, f, d = c.training, c.finetuning, c.data
    if not t.do_train and not t.do_eval:
        out.append("do_train and do_eval are both false: nothing to do; set do_train: true")
    if d.dataset is None and t.do_train:
        out.append("dataset: required for training; name one or more datasets of <dataset_dir>/dataset_info.json (e.g. dpo_en_demo)")
    if t.output_dir is None:
        out.append("output_dir: required for training; set it to where the adapter should be written")
    elif check_paths and _is_nonempty_dir(t.output_dir) and not t.overwrite_output_dir and not t.resume_from_checkpoint:
        out.append(
            f"output_dir: {t.output_dir!r} already exists and is not empty; set overwrite_output_dir: true to replace it, "
            "or resume_from_checkpoint: true to continue the run in it"
        )
    if f.stage != "dpo":
        for key in _DPO_ONLY:
            if key in c.given:
                out.append(f"{key}: only used with stage: dpo (stage is {f.stage!r}); set stage: dpo or remove {key}")
    if f.dpo_label_smoothing and f.pref_loss not in ("sigmoid", "robust"):
        out.append(f"dpo_label_smoothing: only used with pref_loss sigmoid or robust (pref_loss is {f.pref_loss!r})")
    if "simpo_gamma" in c.given and f.pref_loss != "simpo":
        out.append(f"simpo_gamma: only used with pref_loss: simpo (pref_loss is {f.pref_loss!r})")
    if f.precompute_ref_log_probs and f.pref_loss in ("orpo", "simpo"):
        out.append(f"precompute_ref_log_probs: pref_loss {f.pref_loss!r} uses no reference model; remove it")
    if f.prefix_sharing and t.padding_free is False:
        out.append("prefix_sharing: needs packed passes, and padding_free is false; remove padding_free: false or "
                   "prefix_sharing: true")
    if f.precompute_ref_batch_size is not None:
        if f.precompute_ref_batch_size < 1:
            out.append(f"precompute_ref_batch_size: must be >= 1, got {f.precompute_ref_batch_size}")
        if not f.precompute_ref_log_probs:
            out.append("precompute_ref_batch_size: only used with precompute_ref_log_probs: true; set it or remove the key")
    if not 0.0 <= f.dpo_label_smoothing < 0.5:
        out.append(f"dpo_label_smoothing: must be in [0, 0.5), got {f.dpo_label_smoothing}")
    if f.create_new_adapter and not c.model.adapter_name_or_path:
        out.append("create_new_adapter: needs adapter_name_or_path (the adapters to merge before training a new one)")
    if t.bf16 and t.fp16:
        out.append("bf16 and fp16: choose one mixed-precision mode")
    if not 0.0 <= t.warmup_ratio < 1.0:
        out.append(f"warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.micro_batch_tokens < 0:
        out.append(f"micro_batch_tokens: must be >= 0 (0 keeps the batching as written), got {t.micro_batch_tokens}")
    if t.learning_rate <= 0:
        out.append(f"learning_rate: must be > 0, got {t.learning_rate}")
    if t.do_eval and not d.val_size and not d.eval_dataset:
        out.append("do_eval: needs val_size > 0 or eval_dataset")
    if d.val_size < 0:
        out.append(f"val_size: must be a fraction in (0, 1) or a row count >= 1, got {d.val_size}")
    elif d.val_size >= 1 and not float(d.val_size).is_integer():
        out.append(f"val_size: a count must be a whole number of rows, got {d.val_size}")
    resume = t.resume_from_checkpoint
    if check_paths and isinstance(resume, str) and resume.lower() != "latest" and not Path(resume).is_dir():
        out.append(f"resume_from_checkpoint: {resume!r} is not a directory; give a checkpoint-N directory or true for the latest")
    for reporter in t.report_to:
        if reporter not in _REPORTERS:
            out.append(f"report_to: {reporter!r} is not one of {', '.join(_REPORTERS)}")
        elif _REPORTERS[reporter] and importlib.util.find_spec(_REPORTERS[reporter]) is None:
            out.append(f"report_to: {reporter!r} needs the {_REPORTERS[reporter]} package; pip install {_REPORTERS[reporter]}")
    if "none" in t.report_to and len(t.report_to) > 1:
        out.append("report_to: 'none' cannot be combined with other loggers")
    return out


def _common_checks(c: "KllamaConfig", check_paths: bool) -> list[str]:
    out: list[str] = []
    if not c.model.model_name_or_path:
        out.append("model_name_or_path: required; set it to a Hugging Face model directory")
    f, e, d = c.finetuning, c.engine, c.data
    for key in ("lora_rank", "cutoff_len", "chunk_size"):
        section = {"lora_rank": f, "cutoff_len": d, "chunk_size": e}[key]
        if getattr(section, key) <= 0:
            out.append(f"{key}: must be > 0, got {getattr(section, key)}")
    if d.max_samples is not None and d.max_samples <= 0:
        out.append(f"max_samples: must be > 0, got {d.max_samples}")
    if e.cpu_infer is not None and e.cpu_infer <= 0:
        out.append(f"cpu_infer: must be > 0 threads, got {e.cpu_infer}")
    out.extend(kt_problems(c))
    if e.expert_dtype in ("int8", "int4", "fp8") and not e.use_kt:
        out.append(f"expert_dtype: {e.expert_dtype} quantizes the routed experts the expert engine holds; set use_kt: "
                   "true or remove expert_dtype")
    if e.kt_optimize_rule and not e.use_kt:
        out.append("kt_optimize_rule: only used with use_kt: true; set use_kt: true or remove the rule")
    if e.kt_optimize_rule and check_paths and resolve_config_path(e.kt_optimize_rule, c) is None:
        out.append(f"kt_optimize_rule: file {e.kt_optimize_rule!r} not found (looked in the working directory, next to the "
                   "config file and in kllama's examples/); give the rule file's path")
    if e.max_gpu_memory is not None:
        from kllama.config.units import parse_bytes

        try:
            parse_bytes(e.max_gpu_memory)
        except ValueError as exc:
            out.append(f"max_gpu_memory: {exc}")
    if not 0.0 <= e.gpu_memory_utilization <= 1.0:
        out.append(f"gpu_memory_utilization: a fraction of the GPU's memory in [0, 1], got {e.gpu_memory_utilization} "
                   "(0 keeps every layer's experts in host RAM at inference)")
    return out


def _infer_checks(c: "KllamaConfig", check_paths: bool) -> list[str]:
    out: list[str] = []
    g = c.generation
    if g.infer_backend == "ktransformers" and not c.engine.use_kt:
        out.append("infer_backend: ktransformers runs kllama's expert engine and needs use_kt: true")
    if g.max_new_tokens <= 0:
        out.append(f"max_new_tokens: must be > 0, got {g.max_new_tokens}")
    if g.kt_maxlen < 2:
        out.append(f"kt_maxlen: must be >= 2 (a prompt token and an answer token), got {g.kt_maxlen}")
    if g.temperature < 0:
        out.append(f"temperature: must be >= 0, got {g.temperature}")
    if not 0.0 < g.top_p <= 1.0:
        out.append(f"top_p: must be in (0, 1], got {g.top_p}")
    return out


def _export_checks(c: "KllamaConfig", check_paths: bool) -> list[str]:
    out: list[str] = []
    if not c.export.export_dir:
        out.append("export_dir: required by kllama export; set it to where the merged checkpoint should be written")
    if c.export.export_legacy_format:
        out.append("export_legacy_format: not supported yet (kllama writes safetensors only); remove it")
    if c.export.export_size <= 0:
        out.append(f"export_size: must be > 0 GB, got {c.export.export_size}")
    return out


_COMMAND_CHECKS: dict[str, tuple[Callable[["KllamaConfig", bool], list[str]], ...]] = {
    "train": (_common_checks, _train_checks),
    "chat": (_common_checks, _infer_checks),
    "api": (_common_checks, _infer_checks),
    "export": (_common_checks, _export_checks),
    "any": (),
}


def cross_field_problems(config: "KllamaConfig", *, command: str, check_paths: bool = True) -> list[str]:
    """Every cross-field problem of `config` for `command` (train | chat | api | export | any)."""
    problems: list[str] = []
    for check in _COMMAND_CHECKS[command]:
        problems.extend(check(config, check_paths))
    return problems
