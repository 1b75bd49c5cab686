"""Session-wide fixtures shared by every test module.

`tiny_model_dir(arch, seed=0, expert_layout="original")` writes a tiny random model of `arch` once per test session
(per distinct arguments) into a temporary directory and returns its path; use it instead of writing models yourself
so the whole suite pays for each model once.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_model_dir("mixtral")` -> Path of a written tiny model, cached per (arch, seed, layout)."""
    from kllama.model.tiny import write_tiny_model

    cache: dict[tuple[str, int, str], Path] = {}

    def make(arch: str, seed: int = 0, expert_layout: str = "original") -> Path:
        key = (arch, seed, expert_layout)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-s{seed}-{expert_layout}")
            cache[key] = write_tiny_model(out, arch, seed=seed, expert_layout=expert_layout)
        return cache[key]

    return make
