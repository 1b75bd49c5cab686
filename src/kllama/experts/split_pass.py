"""A streamed no-grad pass whose experts `[0, k)` are computed on the CPU while the GPU copies and computes `[k, E)`.

The math is three pieces, shared by the executor and the tests: `cpu_share_rows` (host: the `(token, slot)` rows
routed to experts below `first`, grouped by expert through the CPU pass's per-expert torch path,
`cpu_compute.expert_output`, one output row each), `device_share` (the
compute device: the same grouped-GEMM pass as an unsplit stream pass, over the experts the slot holds; rows of
CPU experts keep their place with routing weight 0, so nothing on the device waits for a row count) and
`combine` (the CPU rows added to the device's sum in fp32, rounded once more). `split_forward` runs them in order.

`SplitExecutor` overlaps them: the hidden states go to pinned host memory after an event and the CPU side is handed
to a worker thread at once (it starts as they land); only then does the main thread acquire the slot (the streamer
copies only `[k, E)` and queues the next layer's copy) and queue the device side; one host->device copy of the CPU
rows, one `index_add_`. The worker uses one intra-op thread fewer than the placement's `cpu_threads`, so the main
thread keeps a core to launch kernels.

On the H200 box (torch.profiler, V2-Lite, 2,048 tokens, k = 10) the two sides overlapped, and a layer cost
`max(copy(E - k), cpu(k) + gap)`: the gap (~3.7 ms) is the serial host path from the worker's end to the next
layer's worker start (the rows' copy and `index_add_`, the next attention launched at host speed, the router,
staging, the acquire, the submit). Two things on that path are cut here: the submit comes before the acquire (the
streamer says what a slot holds without acquiring: `ExpertStreamer.held_from`), and no pinned tensor is allocated per
layer (`HostStaging`: the staged inputs and the CPU side's rows and tokens live in pinned buffers made once per
thread and reused).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from kllama.experts.cpu_compute import expert_output, intra_op_threads, worker_threads
from kllama.experts.quant import ExpertWeight
from kllama.experts.routed import ExpertFactors, ProjectionLora, SavedPass, experts_forward, route
from kllama.experts.split_trace import SplitTiming, record, tracing
from kllama.experts.stream import DeviceExecutor

if TYPE_CHECKING:
    from kllama.experts.module import HostExperts

_WORKER: ThreadPoolExecutor | None = None
_GROWTH = 1.25  # a staging buffer that must grow takes this much more than asked (the CPU rows vary by layer)
R = TypeVar("R")


def _worker() -> ThreadPoolExecutor:
    # one long-lived thread: the CPU side of one layer at a time (the next layer's depends on this one's output)
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kllama-cpu-share")
    return _WORKER


def run_on_worker(fn: Callable[[], R]) -> R:
    """`fn()` run in the split pass's worker thread (the start-up measurement of its CPU side runs where it will)."""
    return _worker().submit(fn).result()


class HostStaging:
    """Host buffers of one thread's split passes, made once and reused (grown when a pass needs more), page-locked
    when `pin`: the inputs the device copies down (`stage_async`) and the CPU side's rows and tokens that go back up
    (`cpu_share_rows`). One set serves every layer: a layer's CPU side has finished before the next layer's pass
    stages anything (the main thread waits for it), and rows are rewritten only after the event recorded after the
    previous rows' copy to the device (`returned`)."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._buffers: dict[str, Tensor] = {}
        self._returned: torch.cuda.Event | None = None

    def take(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """The buffer `name` as a tensor of `shape` and `dtype` (its content is whatever was written last)."""
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            size = nbytes if buf is None else math.ceil(nbytes * _GROWTH)
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[name] = buf
        return buf[:nbytes].view(dtype).view(tuple(shape))

    def returned(self, stream: torch.cuda.Stream) -> None:
        """Mark the rows and tokens copied to the device by the work queued on `stream` so far."""
        self._returned = torch.cuda.Event()
        self._returned.record(stream)

    def wait_returned(self) -> None:
        """Block until the last rows and tokens handed back are on the device (before writing new ones)."""
        if self._returned is not None:
            self._returned.synchronize()


def cpu_share_rows(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    first: int,
    gate_up: ExpertWeight,
    down: ExpertWeight,
    act_fn: Callable[[Tensor], Tensor],
    lora: Mapping[str, ExpertFactors] | None = None,
    *,
    staging: HostStaging | None = None,
) -> tuple[Tensor, Tensor]:
    """Host side: `(tokens [R], rows [R, H])`, the output of every `(token, slot)` row routed to an expert below
    `first` (routing weight applied, in x's dtype; written into `staging`'s buffers when given), rows grouped by
    expert. Host tensors `x [T, H]`, `top_k_index [T, K]`, `top_k_weights [T, K]`; the full host weights (only
    experts < first are read) and per-expert LoRA factors as `HostExperts.lora_factors` gives them for the host. Each
    row is its own output (no top-k sum here), so every expert's rows are written straight into their slice of the
    result: no fp32 buffer, no scatter."""
    tokens, slots = (top_k_index < first).nonzero(as_tuple=True)  # [R] each
    shape = (tokens.numel(), x.shape[-1])
    rows = staging.take("rows", shape, x.dtype) if staging is not None else torch.empty(shape, dtype=x.dtype)
    if tokens.numel() == 0:
        return tokens, rows
    experts = top_k_index[tokens, slots]
    order = torch.argsort(experts, stable=True)
    tokens, slots = tokens[order], slots[order]
    if staging is not None:
        tokens = staging.take("tokens", tokens.shape, tokens.dtype).copy_(tokens)
    ids, counts = torch.unique_consecutive(experts[order], return_counts=True)
    dtype, lora = gate_up.dtype, lora or {}
    xs = x.index_select(0, tokens).to(dtype)  # [R, H]
    ws = top_k_weights[tokens, slots].unsqueeze(1).to(dtype)  # [R, 1]
    start = 0
    for expert, count in zip(ids.tolist(), counts.tolist()):
        span = slice(start, start + count)
        rows[span] = expert_output(xs[span], ws[span], gate_up, down, expert, act_fn, lora.get("gate_up_proj"),
                                   lora.get("down_proj"))
        start += count
    return tokens, rows


def device_share(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    first: int,
    gate_up: Tensor,
    down: Tensor,
    act_fn: Callable[[Tensor], Tensor],
    lora: Mapping[str, ProjectionLora] | None,
    num_experts: int,
    spans: Sequence[slice] | None = None,
) -> Tensor:
    """Device side: `[T, H]` in x's dtype, the sum over each token's rows routed to experts `>= first`, with
    `gate_up [E - first, 2I, H]`, `down [E - first, H, I]` (what the stream slot holds) and the LoRA of all `E`
    experts (its experts `[first, E)` taken here). Rows of CPU experts go to the first held expert with weight 0 (no
    host sync to drop them); `spans` cut the tokens into chunks (the placement's `chunk_size`)."""
    held = num_experts - first
    if held == 0:
        return torch.zeros_like(x)
    mine = top_k_index >= first
    index = torch.where(mine, top_k_index - first, torch.zeros_like(top_k_index))  # [T, K]
    weights = torch.where(mine, top_k_weights, torch.zeros_like(top_k_weights))  # [T, K]
    tail = {target: f.per_expert(num_experts, gate_up.dtype).tail(first) for target, f in (lora or {}).items()}
    outs = [experts_forward(x[s], route(index[s], held), weights[s], gate_up, down, act_fn, tail)[0]
            for s in (spans or [slice(0, x.shape[0])])]
    return torch.cat(outs) if outs else torch.zeros_like(x)


def combine(device_out: Tensor, tokens: Tensor, rows: Tensor) -> Tensor:
    """`device_out [T, H]` plus the CPU `rows [R, H]` of `tokens [R]` (already on its device), summed in fp32."""
    if tokens.numel() == 0:
        return device_out
    return device_out.float().index_add_(0, tokens, rows.float()).to(device_out.dtype)


def split_forward(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    first: int,
    host_weights: tuple[ExpertWeight, ExpertWeight],
    device_weights: tuple[Tensor, Tensor],
    act_fn: Callable[[Tensor], Tensor],
    lora: Mapping[str, ProjectionLora] | None = None,
    host_lora: Mapping[str, ExpertFactors] | None = None,
) -> Tensor:
    """The split pass run in order on x's device (the reference the executor overlaps): experts `[0, first)`
    on the CPU from `host_weights`, `[first, E)` from `device_weights` (those experts only)."""
    num_experts = host_weights[0].shape[0]
    hx, hidx, hw = (t.detach().cpu() for t in (x, top_k_index, top_k_weights))
    tokens, rows = cpu_share_rows(hx, hidx, hw, first, *host_weights, act_fn, host_lora)
    out = device_share(x, top_k_index, top_k_weights, first, *device_weights, act_fn, lora, num_experts)
    return combine(out, tokens.to(x.device), rows.to(x.device))


def cpu_side(ready: torch.cuda.Event | None, staged: Sequence[Tensor], first: int, module: "HostExperts",
             host_lora: Mapping[str, ExpertFactors], threads: int, inference: bool,
             staging: HostStaging | None = None, clock: list[float] | None = None) -> tuple[Tensor, Tensor]:
    """The CPU side of a split pass as the worker thread runs it: wait for the staged `(x, index, weights)` to land
    (`ready`), then `cpu_share_rows` with `threads` intra-op threads, without grad, in inference mode when the
    caller was (grad and inference modes are per thread). With `staging`, the result is written into its (pinned)
    buffers once the previous rows have reached the device, ready for a non-blocking copy. With `clock`, the
    `perf_counter` times of the computation's start and end are appended to it."""
    if ready is not None:
        ready.synchronize()
    if staging is not None:
        staging.wait_returned()
    if clock is not None:
        clock.append(time.perf_counter())
    with torch.no_grad(), torch.inference_mode(inference), intra_op_threads(threads):
        out = cpu_share_rows(*staged, first, *module.host_weights(), module.act_fn, host_lora, staging=staging)
    if clock is not None:
        clock.append(time.perf_counter())
    return out


def submit_cpu_side(ready: torch.cuda.Event | None, staged: Sequence[Tensor], first: int, module: "HostExperts",
                    host_lora: Mapping[str, ExpertFactors], staging: HostStaging | None = None,
                    clock: list[float] | None = None) -> "Future[tuple[Tensor, Tensor]]":
    """`cpu_side` started in the worker thread with one intra-op thread fewer than the placement's."""
    return _worker().submit(cpu_side, ready, staged, first, module, host_lora,
                            worker_threads(module.placement.cpu_threads), torch.is_inference_mode_enabled(), staging,
                            clock)


def stage_async(staging: HostStaging, *tensors: Tensor) -> tuple[list[Tensor], torch.cuda.Event | None]:
    """Host copies of device `tensors` in `staging`'s buffers, queued on the current stream, and the event after
    them (None and the tensors themselves when they are on the host)."""
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors), None
    hosts = [staging.take(f"in{i}", t.shape, t.dtype).copy_(t, non_blocking=True) for i, t in enumerate(tensors)]
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tensors[0].device))
    return hosts, ready


class SplitExecutor(DeviceExecutor):
    """A streamed no-grad pass with the CPU taking the layer's first `HostExperts.split_for` experts (fewer when the
    slot already holds more of the layer, e.g. a DPO reference computed in lock-step after the policy's pass)."""

    def __init__(self) -> None:
        super().__init__(stream=True)
        self._local = threading.local()

    def staging(self) -> HostStaging:
        """This thread's staging buffers (pinned with CUDA; one set for all layers, see `HostStaging`)."""
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = HostStaging(pin=torch.cuda.is_available())
        return staging

    def forward(
        self,
        module: "HostExperts",
        x: Tensor,
        top_k_index: Tensor,
        top_k_weights: Tensor,
        lora_meta: Sequence[tuple[str, float]],
        lora_params: Sequence[Tensor],
        keep: bool,
    ) -> tuple[Tensor, SavedPass | None]:
        if keep or module.streamer is None:  # a training pass needs the whole layer on the GPU for its backward
            return super().forward(module, x, top_k_index, top_k_weights, lora_meta, lora_params, keep)
        device = self.device(module)
        num_tokens = x.shape[0]
        streamer = module.streamer
        with torch.no_grad():
            xd, idx, w = x.detach().to(device), top_k_index.to(device), top_k_weights.detach().to(device)
            host_lora = module.lora_factors(lora_meta, lora_params, torch.device("cpu"))  # kept; a first copy
            # syncs, so before anything is queued. The CPU side is on the layer's critical path: stage and submit
            # it before anything else is launched
            first = streamer.held_from(module, module.split_for(num_tokens))
            job, staging, clock = None, self.staging(), [time.perf_counter()] if tracing() else None
            if first:
                staged, ready = stage_async(staging, xd, idx, w)
                job = submit_cpu_side(ready, staged, first, module, host_lora, staging, clock)
            try:
                gate_up, down, held = streamer.acquire_from(module, num_tokens, first)
                if held != first:
                    raise RuntimeError(f"{module.name}: the slot holds experts [{held}, E), the CPU took [0, {first})")
                lora = module.lora_factors(lora_meta, lora_params, device)
                out = device_share(xd, idx, w, first, gate_up, down, module.act_fn, lora, module.num_experts,
                                   self.chunks(module, num_tokens))
            except BaseException:
                if job is not None:  # a retried pass (after an OOM) restages into the buffers this job still reads
                    wait([job])
                raise
            if job is not None:
                tokens, rows = job.result()
                if clock is not None:  # [staged, cpu_start, cpu_end]
                    record(SplitTiming(module.name, first, tokens.numel(), *clock, time.perf_counter()))
                out = combine(out, tokens.to(device, non_blocking=True), rows.to(device, non_blocking=True))
                staging.returned(torch.cuda.current_stream(device))
            self.done(module, backward=False)
        return out.to(x.device), None
