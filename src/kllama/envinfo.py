"""`kllama env`: the facts about this machine and its libraries that a bug report needs.

The expert engine's speed depends on the CPU (AVX-512/AMX kernels), cores, RAM and GPU, and its behaviour on the
exact torch/transformers/peft versions, so a report without them is hard to act on. Collection never raises:
anything that cannot be read is reported as "unknown".
"""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

# Libraries whose versions change kllama's behaviour, by distribution name.
PACKAGES: tuple[str, ...] = (
    "kllama",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "accelerate",
    "tokenizers",
    "safetensors",
)

# CPU features that decide which expert kernels can run fast (AVX-512 bf16 dot products, AMX tiles).
ISA_FLAGS: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

GIB = 1024**3


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if dist == "kllama":  # running from a source tree (PYTHONPATH=src) without `pip install`
            import kllama

            return f"{kllama.__version__} (source tree {os.path.dirname(kllama.__file__)}, not pip-installed)"
        return "not installed"


def _cpuinfo() -> tuple[str, list[str]]:
    """CPU model name and the ISA_FLAGS it has, from /proc/cpuinfo (Linux); elsewhere the name platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return platform.processor() or "unknown", []
    name, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown":
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, [f for f in ISA_FLAGS if f in flags]


def _torch_facts() -> dict[str, Any]:
    """CPU kernel level torch dispatches to, plus CUDA version and one entry per visible GPU (or "none")."""
    try:
        import torch
    except ImportError:
        return {"torch_cpu_capability": "unknown", "cuda": "none", "gpus": "none"}
    facts: dict[str, Any] = {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda or "none",
        "gpus": "none",
    }
    if torch.cuda.is_available():
        gpus = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "name": props.name,
                    "memory_gib": round(props.total_memory / GIB, 1),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
        facts["gpus"] = gpus
    return facts


def _memory_and_cores() -> dict[str, Any]:
    try:
        import psutil
    except ImportError:
        unknown = "unknown"
        return {
            "cpu_cores_physical": unknown,
            "cpu_cores_logical": os.cpu_count() or unknown,
            "ram_total_gib": unknown,
            "ram_available_gib": unknown,
        }
    mem = psutil.virtual_memory()
    return {
        "cpu_cores_physical": psutil.cpu_count(logical=False) or "unknown",
        "cpu_cores_logical": psutil.cpu_count(logical=True) or "unknown",
        "ram_total_gib": round(mem.total / GIB, 1),
        "ram_available_gib": round(mem.available / GIB, 1),
    }


def collect_env() -> dict[str, Any]:
    """Collect versions (python, platform, torch, transformers, peft, datasets, accelerate, kllama, ...), the CPU
    model and its relevant ISA flags, torch's CPU capability, cores, RAM, and GPUs with CUDA version.

    Values are plain strings/numbers/lists so the dict can be printed, logged or dumped as JSON.
    """
    cpu_name, isa = _cpuinfo()
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    info.update({dist: _version(dist) for dist in PACKAGES})
    info.update({"cpu": cpu_name, "cpu_isa": isa or "none of " + "/".join(ISA_FLAGS)})
    info.update(_memory_and_cores())
    info.update(_torch_facts())
    return info


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value)
    if isinstance(value, dict):  # one GPU
        return f"{value['name']} ({value['memory_gib']} GiB, sm {value['capability']})"
    return str(value)


def format_env(info: dict[str, Any]) -> str:
    """Render `collect_env()` output as aligned `key: value` lines, one GPU per line, ready to paste in an issue."""
    rows: list[tuple[str, str]] = []
    for key, value in info.items():
        if key == "gpus" and isinstance(value, list):
            rows.extend((f"gpu{index}", _show(gpu)) for index, gpu in enumerate(value))
        else:
            rows.append((key, _show(value)))
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in rows)
