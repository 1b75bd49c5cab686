"""What the start-up crossover measurement costs, counted as work rather than wall time: the CPU kernel is imported
without its build tools once built, the passes read the layer's own weights and build nothing layer-sized, each piece
is timed on its own, and the load prints one line saying how long it took."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kllama.experts.cpu_kernels import _why_not_buildable, kernel_status
from kllama.experts.cpu_share import SplitModel, useful_expert_seconds
from kllama.experts.crossover import (
    EXPERT_ROWS, NEVER, Crossovers, copy_bandwidth, cpu_expert_seconds, measure_crossovers, measurement_note,
    pinned_bytes, sample_crossovers, sample_rows_until,
)
from kllama.experts.pinned import host_empty

REPO = Path(__file__).resolve().parents[2]
needs_kernel = pytest.mark.skipif(_why_not_buildable() is not None, reason="no C++ toolchain to build the kernel")
# a layer whose weights are far larger than any activation of the passes below (64 experts, H 256, I 128)
EXPERTS, HIDDEN, INTER, TOP_K = 64, 256, 128, 4


def layer(dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * 0.05).to(dtype)
    down = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * 0.05).to(dtype)
    return gate_up, down


class OpRecorder(TorchDispatchMode):
    """Every op this thread runs: its name, the storages its tensor inputs read and the bytes of each new storage its
    outputs hold (a view of an input is none)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, set[int], list[int]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        made = [t.untyped_storage().nbytes() for t in tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        self.ops.append((str(func), inputs, made))
        return out


@needs_kernel
def test_a_built_kernel_is_imported_without_the_build_tools() -> None:
    # torch's `load` runs ninja, which rebuilt the identical library whenever the source's path or modification time
    # differed from the last build's (a copied tree, a second worktree): 14-16 s inside the start-up measurement
    assert kernel_status().available  # built (or already cached) by this process
    script = (
        "import torch.utils.cpp_extension as ce\n"
        "def refuse(*args, **kwargs):\n"
        "    raise SystemExit('the build tools ran for a library that was already built')\n"
        "ce.load = refuse\n"
        "from kllama.experts.cpu_kernels import kernel_status\n"
        "status = kernel_status()\n"
        "print(status.available, status.isa)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", kernel_status().isa]
    assert "building" not in done.stderr


def test_the_passes_read_the_layers_weights_and_build_nothing_layer_sized() -> None:
    gate_up, down = layer()
    largest = down.nbytes // 4  # an activation of these passes is far smaller; a copy of a weight is not
    weight_storages = {gate_up.untyped_storage().data_ptr(), down.untyped_storage().data_ptr()}
    kernel_status()  # its one-time load-time self-check is no part of what is counted here
    recorder = OpRecorder()
    with recorder:
        # a copy this fast puts every stream floor below the first sample: one token count per kind, in this thread
        found = sample_crossovers(gate_up, down, TOP_K, 1e15, kinds=("inference", "training"), repeats=1,
                                  split=False)
        cpu_expert_seconds(64, gate_up, down, repeats=1)  # the split's samples (run in its worker thread otherwise)
    sizes = [(name, n) for name, _, made in recorder.ops for n in made if n > largest]
    assert sizes == []
    readers = {name for name, inputs, _ in recorder.ops if inputs & weight_storages}
    assert readers  # the torch passes (training, the split's rows) read the layer's weights themselves
    assert {kind: [tokens for tokens, _ in samples] for kind, samples in found.samples.items()} == {
        "inference": [1], "training": [1]}


def test_each_piece_of_the_measurement_is_timed() -> None:
    gate_up, down = layer()
    found = sample_crossovers(gate_up, down, TOP_K, 1e15, repeats=1)
    assert [name for name, _ in found.phases] == ["cpu kernel", "inference", "training", "split"]
    assert all(seconds >= 0 for _, seconds in found.phases)
    # at that copy speed no split can pay: the sampling stopped after the first row count
    assert [rows for rows, _ in found.expert_samples] == [32]
    slow_copy = sample_crossovers(gate_up, down, TOP_K, 1e3, repeats=1, kinds=())
    assert [rows for rows, _ in slow_copy.expert_samples] == list(EXPERT_ROWS)
    fp32 = sample_crossovers(*layer(torch.float32), TOP_K, 1e15, repeats=1, kinds=("inference",), split=False)
    assert [name for name, _ in fp32.phases] == ["inference"]  # the kernel reads no fp32 weights: not loaded for it


@pytest.mark.parametrize("copy_ms", [2.0, 8.0, 20.2, 30.0, 60.0])
def test_the_split_samples_stop_where_no_plan_could_change(copy_ms: float) -> None:
    # per-expert seconds as the H200 box sampled them (benchmarks/NOTES.md, seventh session), at several copy speeds:
    # the plans of every pass length from the samples taken equal those from all six
    box = dict([(32, 0.96e-3), (64, 1.09e-3), (128, 1.45e-3), (192, 1.79e-3), (256, 2.14e-3), (512, 3.80e-3)])
    copy_s = copy_ms * 1e-3
    taken = sample_rows_until(box.__getitem__, useful_expert_seconds(copy_s, 64))
    assert taken == tuple(box.items())[: len(taken)]

    def model(samples: tuple[tuple[int, float], ...]) -> SplitModel:
        return SplitModel(64, 6, copy_s, 55e9, 4096, samples)

    full = tuple(box.items())
    plans = {tokens: model(full).plan(tokens).cpu_experts for tokens in range(1, 20000, 37)}
    assert {tokens: model(taken).plan(tokens).cpu_experts for tokens in plans} == plans
    if copy_ms == 20.2:  # the box's own copy: short passes split, 512 rows cost more than a split could hide
        assert [rows for rows, _ in taken] == [32, 64, 128, 192, 256] and max(plans.values()) > 0


def test_the_note_sums_the_pieces_of_every_measurement() -> None:
    a = Crossovers(8, 4, phases=(("cpu kernel", 0.05), ("inference", 0.25), ("split", 0.125)))
    b = Crossovers(8, 4, phases=(("inference", 0.25),))
    assert measurement_note([a]) == "crossovers measured in 0.42 s (cpu kernel 0.05, inference 0.25, split 0.12)"
    assert measurement_note([a, b]) == "crossovers measured in 0.68 s (cpu kernel 0.05, inference 0.50, split 0.12)"
    assert measurement_note([]) is None
    assert measurement_note([Crossovers(NEVER, NEVER)]) is None  # no CUDA device: nothing was measured


def test_pageable_weights_give_no_copy_source() -> None:
    gate_up, _ = layer()
    assert pinned_bytes(gate_up, 1024) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_copy_is_probed_from_the_layers_pinned_bytes() -> None:
    nbytes = 64 << 20
    host = host_empty(nbytes // 2, torch.bfloat16, pin=True).view(1, -1)
    source = pinned_bytes(host, nbytes // 4)
    assert source is not None and source.numel() == nbytes // 4 and source.data_ptr() == host.data_ptr()
    assert pinned_bytes(host, 2 * nbytes) is None  # smaller than the probe: a buffer of its own is pinned
    from_layer = copy_bandwidth(torch.device("cuda"), source=source)
    own = copy_bandwidth(torch.device("cuda"), probe_bytes=nbytes // 4)
    print(f"copy from the layer's bytes {from_layer / 1e9:.1f} GB/s, from a probe buffer {own / 1e9:.1f} GB/s")
    assert 0.5 < from_layer / own < 2


@pytest.mark.gpu
@pytest.mark.gpu_exclusive  # compares two timings
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_measurement_on_the_layers_own_weights_matches_a_built_probe_layer() -> None:
    # full V2-Lite layer shape, pinned as the engine holds it; both measurements agree within a factor 2
    hidden, inter, experts, top_k = 2048, 1408, 64, 6
    gate_up = host_empty(experts * 2 * inter * hidden, torch.bfloat16, pin=True).view(experts, 2 * inter, hidden)
    down = host_empty(experts * hidden * inter, torch.bfloat16, pin=True).view(experts, hidden, inter)
    gate_up.fill_(0.01)
    down.fill_(0.01)
    kernel_status()
    own = measure_crossovers(hidden, inter, experts, top_k, torch.bfloat16, "cuda", weights=(gate_up, down))
    built = measure_crossovers(hidden, inter, experts, top_k, torch.bfloat16, "cuda")
    print(measurement_note([own]), "/", measurement_note([built]))
    assert [name for name, _ in own.phases] == ["copy probe", "cpu kernel", "inference", "training", "split"]
    assert [name for name, _ in built.phases][0] == "probe layer"
    for kind in ("inference", "training"):
        a, b = getattr(own, kind), getattr(built, kind)
        assert max(a, b) <= 2 * min(a, b) + 2
    with pytest.raises(ValueError, match="not the layer shape"):
        measure_crossovers(hidden, inter // 2, experts, top_k, torch.bfloat16, "cuda", weights=(gate_up, down))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_engine_says_how_long_its_measurement_took() -> None:
    from kllama.experts import ExpertPlacement, install_expert_engine
    from kllama.model.tiny import build_tiny_model

    model = build_tiny_model("deepseek_v2", seed=0, dtype=torch.bfloat16).cuda().eval()
    engine = install_expert_engine(model, lambda name: ExpertPlacement.from_mode("auto"), "cuda")
    note = engine.measurement_note()
    print(note)
    assert note is not None and note.startswith("crossovers measured in ")
    assert "probe layer" not in note and "copy probe" in note
    assert len(engine.measured) == 1  # every MoE layer has the same shape: measured once
