"""Fixtures of the benchmark scripts' tests: a script under benchmarks/ imported as a module."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

FOLDER = str(Path(__file__).resolve().parents[2] / "benchmarks")


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], ModuleType]:
    """`benchmark_script("layer_split")` -> benchmarks/layer_split.py as a module (its sibling imports resolved)."""
    def load(name: str) -> ModuleType:
        sys.path.insert(0, FOLDER)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(FOLDER)

    return load
