"""Modules of Triton kernels imported at first use: importing Triton costs start-up time that a run not using them
should not pay, and CPU builds of torch lack it (the callers then take torch's ops)."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def triton_kernels(module: str) -> ModuleType | None:
    """The kernel module `kllama.experts.<module>`, imported once, or None where Triton is missing."""
    try:
        return importlib.import_module(f"kllama.experts.{module}")
    except ImportError:  # CPU builds of torch
        return None
