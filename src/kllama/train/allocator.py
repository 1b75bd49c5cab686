"""The CUDA caching allocator `kllama train` runs with: expandable segments unless the user chose a configuration.

Promotion (`kllama.train.promotion`) fills `max_gpu_memory` up to a measured worst step plus a margin, and the cap
(`set_per_process_memory_fraction`) limits the allocator's *reserved* memory, so reserved-but-unusable bytes count
against it. With torch's default allocator every `cudaMalloc` is its own segment and a free block never merges
across segments: the seed-YAML OOM had 1.76 GiB of such holes (8.7 % of its allocation). With
`expandable_segments:True` each stream's pool is one virtual range that grows by mapped pages (20 MiB for large
blocks), free neighbours always merge, and when an allocation would pass the cap the allocator unmaps every free
page (also those between live blocks) and tries again, so only the partly used pages at live blocks' edges stay
lost (docs/design.md, "The training allocator").

The setting must be in the environment before CUDA initialises, so the command line sets it before anything else
runs; torchrun's workers inherit it. A value the user set in `PYTORCH_CUDA_ALLOC_CONF` or `PYTORCH_ALLOC_CONF`
(torch >= 2.9 reads both) is left as it is.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping

# the names torch reads its allocator configuration from (the second one since torch 2.9)
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
TRAIN_ALLOC_CONF = "expandable_segments:True"


def user_alloc_conf(env: Mapping[str, str]) -> dict[str, str]:
    """The allocator variables the environment sets (name -> value)."""
    return {name: env[name] for name in ALLOC_CONF_VARS if name in env}


def use_training_allocator(env: MutableMapping[str, str]) -> str:
    """Set `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` in `env` unless it sets an allocator variable already;
    returns the line saying which configuration the run uses."""
    chosen = user_alloc_conf(env)
    if chosen:
        given = ", ".join(f"{name}={value}" for name, value in chosen.items())
        return f"GPU allocator: {given} (yours; kllama train would set PYTORCH_CUDA_ALLOC_CONF={TRAIN_ALLOC_CONF})"
    env[ALLOC_CONF_VARS[0]] = TRAIN_ALLOC_CONF
    return (f"GPU allocator: PYTORCH_CUDA_ALLOC_CONF={TRAIN_ALLOC_CONF} (set by kllama train: free GPU memory "
            "stays usable under max_gpu_memory; set PYTORCH_CUDA_ALLOC_CONF yourself to choose another)")


def expandable_segments(env: Mapping[str, str]) -> bool:
    """Whether the allocator configuration in `env` turns expandable segments on: every allocator variable set says
    `expandable_segments:True` (torch versions differ in which of the two wins when both are set)."""
    values = user_alloc_conf(env).values()
    return bool(values) and all(_says_expandable(value) for value in values)


def _says_expandable(conf: str) -> bool:
    options = dict(part.split(":", 1) for part in conf.replace(" ", "").split(",") if ":" in part)
    return options.get("expandable_segments", "").lower() == "true"
