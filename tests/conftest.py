"""Session-wide fixtures shared by every test module.

`tiny_model_dir(arch, seed=0, expert_layout="original")` writes a tiny random model of `arch` once per test session
(per distinct arguments) into a temporary directory and returns its path; use it instead of writing models yourself
so the whole suite pays for each model once. `pytest_configure` caps the CPU threads (see there); an autouse fixture
puts the allocator variables `kllama train` sets back after each test. Under pytest-xdist, a test marked
`gpu_exclusive` has the GPU to itself (`_gpu_turn`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MAX_TEST_THREADS = 4  # tiny models gain nothing from more; several suites share a 16-core GPU box


def pytest_configure(config: pytest.Config) -> None:
    """Cap the CPU threads of the test process and of the `kllama` subprocesses tests start (they inherit the
    environment) at min(4, usable CPUs), unless OMP_NUM_THREADS is set: torch's default of one thread per core
    oversubscribed a 16-core box running several pytest processes at once (> 165 s each)."""
    if not os.environ.get("OMP_NUM_THREADS"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(min(MAX_TEST_THREADS, cpus))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _allocator_variables() -> Iterator[None]:
    """`kllama train` run in the test process sets PYTORCH_CUDA_ALLOC_CONF (`kllama.train.allocator`): put the
    allocator variables back as they were after each test, so no test sees another's."""
    names = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _gpu_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under pytest-xdist (`-n N`), GPU tests share the card and a `gpu_exclusive` test waits until it is alone on
    it: tests that time the GPU or fill its memory (a 65,536-token pass) failed when three other workers held it.
    A read-write lock from two file locks: readers (`gpu`) hold the main lock shared, a writer (`gpu_exclusive`) holds
    it exclusive, and both pass through a turnstile first, so a waiting writer stops new readers instead of waiting
    for a moment when no worker holds the card. One process alone (`make test`) takes no locks."""
    exclusive = request.node.get_closest_marker("gpu_exclusive") is not None
    if not os.environ.get("PYTEST_XDIST_WORKER") or not (exclusive or request.node.get_closest_marker("gpu")):
        yield
        return
    root = Path(tempfile.gettempdir()) / f"kllama-tests-gpu-{os.getuid()}"
    root.mkdir(exist_ok=True)
    with contextlib.ExitStack() as held:
        with _flock(root / "turnstile", fcntl.LOCK_EX):
            held.enter_context(_flock(root / "card", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH))
        yield


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
