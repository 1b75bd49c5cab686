"""`kllama env` report: has what a bug report needs, and prints aligned."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kllama.envinfo import ISA_FLAGS, collect_env, format_env

REQUIRED = (
    "python", "platform", "kllama", "torch", "transformers", "peft", "datasets", "accelerate",
    "cpu", "cpu_isa", "torch_cpu_capability", "cpu_cores_physical", "cpu_cores_logical",
    "ram_total_gib", "ram_available_gib", "cuda", "gpus",
)


def test_collect_env_has_every_key_and_real_values():
    info = collect_env()
    for key in REQUIRED:
        assert key in info, key
    assert info["python"] == sys.version.split()[0]
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["kllama"] != "not installed"
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert 0 < info["ram_available_gib"] <= info["ram_total_gib"]
    assert info["cpu_cores_logical"] >= 1
    json.dumps(info)  # plain data, loggable as JSON
    if not torch.cuda.is_available():
        assert info["gpus"] == "none"


def test_isa_flags_come_from_cpuinfo():
    info = collect_env()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return
    flags = set(next(l for l in cpuinfo.read_text().splitlines() if l.startswith("flags")).split(":")[1].split())
    expected = [f for f in ISA_FLAGS if f in flags]
    assert info["cpu_isa"] == (expected or "none of " + "/".join(ISA_FLAGS))


def test_format_env_aligns_values_and_lists_each_gpu():
    info = {
        "python": "3.12.1",
        "transformers": "5.17.0",
        "cpu_isa": ["avx2", "amx_tile"],
        "gpus": [
            {"name": "NVIDIA H100", "memory_gib": 79.2, "capability": "9.0"},
            {"name": "NVIDIA H100", "memory_gib": 79.2, "capability": "9.0"},
        ],
    }
    lines = format_env(info).splitlines()
    assert lines == [
        "python:       3.12.1",
        "transformers: 5.17.0",
        "cpu_isa:      avx2, amx_tile",
        "gpu0:         NVIDIA H100 (79.2 GiB, sm 9.0)",
        "gpu1:         NVIDIA H100 (79.2 GiB, sm 9.0)",
    ]


def test_format_env_of_this_machine_mentions_every_key():
    text = format_env(collect_env())
    for key in REQUIRED:
        if key != "gpus" or not torch.cuda.is_available():
            assert f"\n{key}:" in "\n" + text, key


def test_a_source_tree_run_reports_kllama_version_not_missing(monkeypatch):
    # `PYTHONPATH=src` without `pip install` (how the GPU machine runs the suite): no distribution metadata
    import kllama
    from kllama import envinfo

    def missing(dist: str) -> str:
        raise envinfo.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(envinfo.metadata, "version", missing)
    assert envinfo._version("kllama").startswith(f"{kllama.__version__} (source tree ")
    assert envinfo._version("torch") == "not installed"
