"""Swap a model's stock routed-experts modules for HostExperts and wire them into one engine handle."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from kllama.errors import KllamaError
from kllama.experts.cpu_share import SplitModel
from kllama.experts.crossover import PASS_KINDS, Crossovers, measure_crossovers, measurement_note
from kllama.experts.families import FamilySpec, family_of, find_expert_modules, layer_index
from kllama.experts.module import HostExperts
from kllama.experts.placement import TARGETS, ExpertPlacement, Target
from kllama.experts.quant import scheme_of
from kllama.experts.shared_overlap import SharedOverlap
from kllama.experts.stream import ExpertStreamer


@dataclass
class ExpertEngine:
    """Handle on an installed expert engine: the HostExperts modules (layer order) and their shared streamer."""

    modules: dict[str, HostExperts]
    streamer: ExpertStreamer | None
    # qualified name -> the start-up crossover measurement of its layer shape (timings behind the estimates)
    measurements: dict[str, Crossovers] = field(default_factory=dict)
    measured: tuple[Crossovers, ...] = ()  # every start-up measurement, one per distinct layer shape (its cost)

    @property
    def placements(self) -> dict[str, ExpertPlacement]:
        """Qualified name -> the placement each module runs with (crossovers filled in)."""
        return {name: m.placement for name, m in self.modules.items()}

    def split_note(self, num_tokens: int = 2048) -> str | None:
        """What a long no-grad pass of `num_tokens` tokens does with its experts (the first layer with a measured
        split model; every MoE layer of a model has the same shape), or None when none was measured."""
        model = next((m.cpu_share for m in self.modules.values() if m.cpu_share is not None), None)
        return model.describe(num_tokens) if model is not None else None

    def measurement_note(self) -> str | None:
        """How long the start-up crossover measurement took, piece by piece (None when nothing was measured)."""
        return measurement_note(self.measured)

    def host_bytes(self) -> int:
        """Host memory held by all routed weights."""
        return sum(m.host_bytes() for m in self.modules.values())

    def gpu_bytes(self) -> int:
        """GPU memory held by the engine: resident weights, expert LoRA and the two stream slots."""
        slots = self.streamer.gpu_bytes() if self.streamer is not None else 0
        return slots + sum(m.gpu_bytes() for m in self.modules.values())

    @contextmanager
    def force_target(self, target: Target | None) -> Iterator[None]:
        """Run every layer's passes on `target` (`cpu | stream | gpu`, None = the placements) inside the block."""
        if target is not None and target not in TARGETS:
            raise KllamaError(f"unknown expert target {target!r}; choose one of {', '.join(TARGETS)}")
        before = {name: m.forced_target for name, m in self.modules.items()}
        for module in self.modules.values():
            module.forced_target = target
        try:
            yield
        finally:
            for name, module in self.modules.items():
                module.forced_target = before[name]


def _resolve_crossovers(model: nn.Module, modules: list[HostExperts],
                        ) -> tuple[dict[str, Crossovers], tuple[Crossovers, ...]]:
    # CUDA layers whose long passes stream get the split model of long no-grad passes (`cpu_share`), measured once per
    # distinct layer shape (on CPU the stream target falls back to cpu anyway). `auto` placements without a crossover
    # also get both crossovers (inference, training) from the same measurement; a no-grad crossover a rule already
    # fixed (a KTransformers CPU entry) is kept. The first layer of a shape is measured on its own host weights.
    # Returns each module's measurement where crossovers were measured, and every measurement made.
    top_k = getattr(model.config, family_of(model).top_k_attr)
    measured: dict[tuple, Crossovers] = {}
    by_module: dict[str, Crossovers] = {}
    for m in modules:
        p = m.placement
        if p.long != "stream" or m.compute_device.type != "cuda":
            continue
        kinds = PASS_KINDS if p.short != p.long and p.crossover_tokens is None else ()
        scheme = scheme_of(m.host_weights()[0])
        key = (m.hidden_dim, m.intermediate_dim, m.num_experts, top_k, m.dtype, scheme, p.cpu_threads, kinds)
        if key not in measured:
            measured[key] = measure_crossovers(
                m.hidden_dim, m.intermediate_dim, m.num_experts, top_k, m.dtype, m.compute_device,
                cpu_threads=p.cpu_threads, scheme=scheme, kinds=kinds, weights=m.host_weights(),
            )
        found = measured[key]
        m.cpu_share = SplitModel.from_crossovers(found, m.num_experts, top_k, m.hidden_dim * m.dtype.itemsize)
        if kinds:
            inference = p.infer_crossover_tokens if p.infer_crossover_tokens is not None else found.inference
            m.placement = p.with_crossovers(inference, found.training)
            by_module[m.name] = found
    return by_module, tuple(measured.values())


def wire_engine(
    model: nn.Module, modules: Mapping[str, HostExperts], *, measure: bool = True, trace: bool = False
) -> ExpertEngine:
    """Connect HostExperts already placed in `model` (e.g. built by the checkpoint loader): order them by layer,
    measure crossovers of `auto` placements (when `measure`), and share one ExpertStreamer among CUDA layers
    (`trace=True` records copy/compute events for overlap checks). A layer whose block calls its shared experts
    after the routed ones gets a `SharedOverlap` (`shared_overlap.py`)."""
    spec = family_of(model)
    ordered = dict(sorted(modules.items(), key=lambda item: layer_index(item[0], spec)))
    layers = list(ordered.values())
    measurements, measured = _resolve_crossovers(model, layers) if measure else ({}, ())
    cuda = [m for m in layers if m.compute_device.type == "cuda"]
    streamer = ExpertStreamer(cuda, cuda[0].compute_device, trace=trace) if cuda else None
    for name, m in ordered.items():
        m.streamer = streamer if m.compute_device.type == "cuda" else None
        m.shared_overlap = _shared_overlap(model, name, spec)
    return ExpertEngine(modules=ordered, streamer=streamer, measurements=measurements, measured=measured)


def _shared_overlap(model: nn.Module, name: str, spec: FamilySpec) -> SharedOverlap | None:
    # the MoE block holding the routed experts `name`, when it calls its shared experts after them
    block = model.get_submodule(name.rpartition(".")[0]) if spec.shared_after and "." in name else None
    shared = getattr(block, spec.shared_after, None) if block is not None else None
    return SharedOverlap.attach(block, shared) if isinstance(shared, nn.Module) else None


def install_expert_engine(
    model: nn.Module,
    placements: Mapping[str, ExpertPlacement] | Callable[[str], ExpertPlacement],
    compute_device: torch.device | str,
    *,
    measure: bool = True,
    trace: bool = False,
    expert_dtype: str | None = None,
) -> ExpertEngine:
    """Replace every stock routed-experts module of a transformers model (e.g. from stock `from_pretrained`) by a
    HostExperts whose weights move to (pinned) host memory, then `wire_engine`. `placements` maps each qualified
    module name to its placement (a mapping must cover every layer) or is a function of the name; `expert_dtype`
    `int8` / `int4` / `fp8` holds the weights quantized (`kllama.experts.quant`)."""
    stock = find_expert_modules(model)
    if isinstance(placements, Mapping):
        missing = [name for name in stock if name not in placements]
        if missing:
            raise KllamaError(f"no expert placement for {', '.join(missing)}; give one per MoE layer or a default")
        choose = placements.__getitem__
    else:
        choose = placements
    modules: dict[str, HostExperts] = {}
    for name, module in stock.items():
        host = HostExperts.from_stock(module, choose(name), name, compute_device, expert_dtype)
        model.set_submodule(name, host)
        modules[name] = host
    return wire_engine(model, modules, measure=measure, trace=trace)
