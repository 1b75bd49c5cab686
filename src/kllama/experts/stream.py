"""Running routed experts on the GPU: streamed from pinned host memory (double-buffered) or resident.

`ExpertStreamer` owns a side CUDA stream and two GPU weight slots shared by all streamed layers. When layer i's
weights are acquired it queues the copy of the neighbouring layer (i+1 in forward, i-1 in backward) into the other
slot, so that copy overlaps layer i's compute; a slot is overwritten only after the compute stream has passed the
event recorded when its previous layer was released. The direction is read from the call order (a lower layer index
than the last one means backward, which also covers activation-checkpoint recomputation), and at either end of the
stack the prefetch turns around (after the last layer's forward comes its backward; after layer 0's backward comes
the next forward). A no-grad pass has no backward to turn to, so after its last layer it prefetches the first
streamed layer for the next forward (the policy forward after a DPO reference pass, the next long prefill). A layer
acquired twice in a row (its backward right after its forward, or the DPO reference computed in lock-step with the
policy) keeps the prefetch its first acquire queued.

Quantized weights (`kllama.experts.quant`) cross PCIe as they are stored (half the bytes of bf16): they land in one
GPU buffer shared by both slots and are dequantized on the copy stream into the slot's weights, which stay in the
compute dtype, so the compute stream sees what it sees for bf16 weights (and a copy record's time includes the
dequantization).

A long no-grad pass may leave a layer's first experts to the CPU (`split_pass.py`): the slot then holds experts
`[first, E)` only, copied as one slice of each pinned host weight (values and scales alike when quantized) into the
front of the slot's full-size buffers. A slot holding more of a layer (a smaller `first`) serves a request for less,
so a lock-step DPO reference after the policy's pass of a layer reuses the whole layer instead of copying it again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kllama.experts.quant import ExpertWeight, QuantizedWeight, dequantize, weight_nbytes
from kllama.experts.routed import PassExecutor

if TYPE_CHECKING:
    from kllama.experts.module import HostExperts


@dataclass
class _Slot:
    gate_up: Tensor | None = None
    down: Tensor | None = None
    layer: int | None = None
    first: int = 0  # the slot holds experts [first, E) of its layer, at the front of its buffers
    ready: torch.cuda.Event | None = None  # copy into the slot finished (copy stream)
    released: torch.cuda.Event | None = None  # last compute reading the slot finished (compute stream)
    last_used: int = -1


@dataclass
class CopyRecord:
    """Timing events of one host->GPU layer copy (filled only when the streamer traces)."""

    layer: int
    start: torch.cuda.Event
    end: torch.cuda.Event


@dataclass
class ComputeRecord:
    """Timing events of one layer's compute on streamed weights (forward or backward)."""

    layer: int
    backward: bool
    start: torch.cuda.Event
    end: torch.cuda.Event


@dataclass
class ExpertStreamer:
    """Double-buffered host->GPU weight streaming shared by the streamed HostExperts of one model (layer order)."""

    layers: list["HostExperts"]
    device: torch.device
    trace: bool = False
    copies: list[CopyRecord] = field(default_factory=list)
    computes: list[ComputeRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = {id(m): i for i, m in enumerate(self.layers)}
        self._slots = [_Slot(), _Slot()]
        self._stream = torch.cuda.Stream(self.device)
        self._clock = 0
        self._last: int | None = None
        self._backward = False
        self._open: dict[int, torch.cuda.Event] = {}
        self._landing: list[QuantizedWeight] = []  # where quantized weights arrive before dequantization
        self._acquired: dict[int, _Slot] = {}  # layer -> the slot its current pass reads (until release)

    def gpu_bytes(self) -> int:
        """Bytes held by the two GPU weight slots (and the landing buffers of quantized weights)."""
        slots = sum(t.numel() * t.element_size() for s in self._slots for t in (s.gate_up, s.down) if t is not None)
        return slots + sum(weight_nbytes(w) for w in self._landing)

    def _land(self, weights: tuple[ExpertWeight, ExpertWeight]) -> list[QuantizedWeight]:
        # landing buffers matching quantized host weights, reused while the shapes stay the same
        wanted = [w for w in weights if isinstance(w, QuantizedWeight)]
        if len(wanted) != len(self._landing) or any(not a.matches(b) for a, b in zip(self._landing, wanted)):
            self._landing = [w.empty_like(self.device) for w in wanted]
            for land in self._landing:  # used on the copy stream: freeing them must wait for it
                land.data.record_stream(self._stream)
                land.scale.record_stream(self._stream)
        return self._landing

    def invalidate(self) -> None:
        """Forget what the slots hold so the next pass copies every layer again (benchmarks; weights changed)."""
        for slot in self._slots:
            slot.layer = None
            slot.first = 0
        self._last = None

    def _slot_of(self, layer: int, first: int = 0) -> _Slot | None:
        # a slot holding experts [f, E) of the layer with f <= first (the most of the layer if two do)
        held = [s for s in self._slots if s.layer == layer and s.first <= first]
        return min(held, key=lambda s: s.first) if held else None

    def _load(self, layer: int, keep: _Slot | None, first: int = 0) -> _Slot:
        slot = min((s for s in self._slots if s is not keep), key=lambda s: s.last_used)
        module = self.layers[layer]
        gate_up, down = module.host_weights()
        for attr, host in (("gate_up", gate_up), ("down", down)):
            current = getattr(slot, attr)
            if current is None or current.shape != host.shape or current.dtype != host.dtype:
                setattr(slot, attr, torch.empty(host.shape, dtype=host.dtype, device=self.device))
        with torch.cuda.stream(self._stream):
            if slot.released is not None:
                self._stream.wait_event(slot.released)  # never overwrite weights a queued kernel still reads
            start = torch.cuda.Event(enable_timing=True) if self.trace else None
            if start is not None:
                start.record(self._stream)
            self._copy_into(slot, (gate_up, down), first)
            slot.ready = torch.cuda.Event(enable_timing=self.trace)
            slot.ready.record(self._stream)
        if start is not None:
            self.copies.append(CopyRecord(layer, start, slot.ready))
        slot.layer = layer
        slot.first = first
        slot.released = None
        self._clock += 1
        slot.last_used = self._clock
        return slot

    def _copy_into(self, slot: _Slot, host: tuple[ExpertWeight, ExpertWeight], first: int) -> None:
        # on the copy stream: experts [first, E) into the front of the slot; plain weights straight in, quantized ones
        # into the landing buffers, then dequantized into the slot (both ordered on this stream, so the next copy
        # cannot overwrite a landing buffer before its dequantization has read it)
        landing = iter(self._land(host))
        count = host[0].shape[0] - first
        for target, weight in zip((slot.gate_up, slot.down), host):
            if isinstance(weight, QuantizedWeight):
                land = next(landing).experts(0, count)
                land.copy_(weight.experts(first, first + count), non_blocking=True)
                dequantize(land, out=target[:count])
            else:
                target[:count].copy_(weight[first:], non_blocking=True)

    def _neighbour(self, layer: int, num_tokens: int, backward: bool, training: bool) -> int | None:
        streamed = [i for i, m in enumerate(self.layers) if m.target_for(num_tokens, training) == "stream"]
        before = [i for i in streamed if i < layer]
        after = [i for i in streamed if i > layer]
        ahead, behind = (before[::-1], after) if backward else (after, before[::-1])
        if ahead:
            return ahead[0]
        if not training and not backward and streamed and streamed[0] != layer:
            return streamed[0]  # no backward follows a no-grad pass: the next forward starts at the bottom
        return behind[0] if behind else None

    def acquire(self, module: "HostExperts", num_tokens: int, backward: bool,
                training: bool = False) -> tuple[Tensor, Tensor]:
        """GPU copies `(gate_up, down)` of `module`'s weights, usable on the current stream; queues the prefetch of
        the next streamed layer in the pass direction (which layers stream depends on the pass kind: `training`).
        Pair every call with `release(module)` after the compute is queued."""
        gate_up, down, _ = self._acquire(module, num_tokens, backward, training, first=0)
        return gate_up, down

    def acquire_from(self, module: "HostExperts", num_tokens: int, first: int) -> tuple[Tensor, Tensor, int]:
        """For a no-grad forward whose CPU side takes experts `[0, first)`: `(gate_up [E-f, 2I, H], down [E-f, H,
        I], f)`, experts `[f, E)` on the GPU with `f <= first` (less than asked when a slot already holds more of
        the layer). Prefetches like `acquire`; pair with `release(module)`."""
        return self._acquire(module, num_tokens, backward=False, training=False, first=first)

    def held_from(self, module: "HostExperts", first: int) -> int:
        """The `f` that `acquire_from(module, _, first)` would give now, without acquiring anything: `first`, or less
        when a slot already holds more of the layer. The split pass asks first, so its CPU side starts before the
        acquire (which queues the next layer's copy)."""
        slot = self._slot_of(self._index[id(module)], first)
        return slot.first if slot is not None else first

    def _acquire(self, module: "HostExperts", num_tokens: int, backward: bool, training: bool,
                 first: int) -> tuple[Tensor, Tensor, int]:
        layer = self._index[id(module)]
        # The layer acquired last, again (its backward after its forward; the lock-step DPO reference after the
        # policy's pass of it): the prefetch its first use queued stands. A no-grad pass's own choice here (the next
        # forward's first layer, after a top layer) would overwrite the layer a backward needs next.
        repeated = layer == self._last
        if backward or (self._last is not None and layer < self._last):
            self._backward = True
        elif self._last is not None and layer > self._last:
            self._backward = False
        self._last = layer
        slot = self._slot_of(layer, first) or self._load(layer, keep=None, first=first)
        self._acquired[layer] = slot
        self._clock += 1
        slot.last_used = self._clock
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(slot.ready)
        training = training or backward
        nxt = None if repeated else self._neighbour(layer, num_tokens, self._backward, training)
        if nxt is not None:
            nxt_first = self.layers[nxt].split_for(num_tokens, training)  # the same pass's split for that layer
            if self._slot_of(nxt, nxt_first) is None:
                self._load(nxt, keep=slot, first=nxt_first)
        if self.trace:
            start = torch.cuda.Event(enable_timing=True)
            start.record(compute)
            self._open[layer] = start
        held = module.num_experts - slot.first
        return slot.gate_up[:held], slot.down[:held], slot.first

    def release(self, module: "HostExperts", backward: bool = False) -> None:
        """Mark the compute queued on `module`'s streamed weights; the slot may be refilled after it."""
        layer = self._index[id(module)]
        slot = self._acquired.pop(layer, None)
        compute = torch.cuda.current_stream(self.device)
        if slot is not None:
            slot.released = torch.cuda.Event(enable_timing=self.trace)
            slot.released.record(compute)
            if self.trace and layer in self._open:
                self.computes.append(ComputeRecord(layer, backward, self._open.pop(layer), slot.released))


class DeviceExecutor(PassExecutor):
    """Runs a HostExperts pass on the compute device with weights either streamed (`stream=True`) or resident."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream

    def weights(self, module: "HostExperts", num_tokens: int, backward: bool, training: bool) -> tuple[Tensor, Tensor]:
        if not self.stream:
            return module.resident_weights()
        if module.streamer is None:
            raise RuntimeError(f"{module.name}: streamed experts need wire_engine() to attach an ExpertStreamer")
        return module.streamer.acquire(module, num_tokens, backward, training)

    def done(self, module: "HostExperts", backward: bool) -> None:
        if self.stream and module.streamer is not None:
            module.streamer.release(module, backward)
