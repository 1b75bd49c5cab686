"""Decode steps replayed as CUDA graphs over the slot KV cache, with CPU (or streamed) expert passes between graphs.

At batch 1 a decode step of a MoE model is a few thousand small kernels; launched one by one from Python they take
~100 ms on the H200 box while the GPU works for a few ms (benchmarks/NOTES.md), and a batch of 32 launches the same
kernels. Here one step is captured once per shape and replayed: `graphed_decoder(model, max_batch, max_len)`
returns a `GraphedDecoder` over a `SlotCache` (kv_cache.py) of `max_batch` slots whose
* `step(ids, positions)` runs one token for each of the first B slots and returns their logits: replayed;
* `packed(segments)` runs several slots' new tokens (prompt chunks, next tokens) in one packed forward: eager;
* `prefill(ids, slot, start)` reads a prompt into one slot: eager.

* **Shapes captured.** A step is captured per (batch bucket, read length): the batch is padded to the next power of
  two (up to `max_batch`) and attention reads positions `0..L-1` of each slot, L the next power of two (at least
  `MIN_READ`) above the batch's last position, up to the slot capacity. Reading only what the batch needs keeps a
  step's attention (and DeepSeek's per-step expansion of its cached latents) proportional to the answers' lengths,
  not to the capacity. Each shape is captured on first use (`captures` counts them, `capture_s` their time: about
  two or three eager forwards each) and replayed ever after; a batch of B rows in a bucket of more runs its padding
  rows at the scratch position (below). `capture_buckets` captures every batch bucket at the shortest read length
  up front (the engine does it when it is built, so requests never wait for those).
* **Scratch position.** A slot holds `max_len + 1` positions; the last one is scratch: padding rows and slots a step
  leaves idle (position -1 in `step`) write there and see everything, and no real token ever sees it.
* **CPU expert passes are host nodes of the graph.** While a step is captured, every no-grad expert pass goes
  through `expert_pass_hook`. A pass that runs on the GPU without a host sync (`HostExperts.capturable`: resident
  weights, torch's grouped GEMM) is captured in line. A pass on the CPU that the C++ kernel takes (decode's, up to
  64 rows) is captured too, as a host node (`cpu_compute.HostNodePass`): copies of x and the routing into pinned
  buffers, the kernel run by the CUDA driver's thread (`cuLaunchHostFunc`, `kllama.experts.host_func`; no Python,
  no GIL), and the copy of its output back, all in order with the graph's kernels. A step of CPU layers is then
  one graph, with no stream sync and no Python between layers; a host node computes only the step's real rows
  (`job.rows`, set before each replay), so padding rows cost the CPU nothing. The warm-up forward before a capture
  makes each node's pinned buffers (a capture cannot allocate them). A decoder dropped with a replay in flight
  waits for it first: its host nodes read jobs and buffers that die with it.
* **Threads of the host nodes.** The thread that replays a step then waits for its logits. By default
  (`spare_core=True`) a host node's kernel runs with the placement's `cpu_threads` minus one, and the waiting
  thread spins on the core left over (what the sixteenth session measured). With `spare_core=False` the kernel
  takes all `cpu_threads` and the replaying thread sleeps until the step is done (a blocking CUDA event), so no
  core is spent waiting. On the H200 box 16 threads ran the kernel 5-10 % faster than 15, back to back. In decode
  (`decode.py --spare-core on,off --interleave 10`) every core moved tok/s by -2 to +3 %, within the rounds'
  spread (benchmarks/NOTES.md, eighteenth session). The replaying thread's blocking wait and wake-up take back
  part of the gain, so the default keeps the spare core.
* **Graphs cut at expert passes that cannot be captured.** Any other pass (streamed layers, a pass the kernel does
  not take, or every CPU pass with `host_nodes=False`, or under `OMP_WAIT_POLICY=active`, below) ends the current
  graph, is recorded as an eager call on the captured tensors writing into a static output, and a new graph begins:
  graph, pass, graph, pass, ... An eager pass also gets only the step's real rows.
* **What host nodes bought** (benchmarks/NOTES.md, sixteenth session; `decode.py --host-nodes on,off`, V2-Lite
  shape, every layer on the CPU, one H200 box per pair): int8 experts 38.8-45.7 tok/s against 39.2-40.1 with eager
  passes between graphs, bf16 25.2-27.3 against 23.1-27.4. The kernel's own time is now nearly all of the expert
  time (int8 16.5-20.6 ms of 16.3-20.5 a token). `OMP_WAIT_POLICY=active` keeps the main thread's OpenMP team
  spinning on every core while the driver thread's team runs the kernel: 146 ms a token instead of 25 on the box,
  so host nodes are not used under it.
* **One pool.** All graphs of a decoder share one memory pool: a replay only touches its own static tensors and
  intermediates that die within it, and replays never overlap. With `split_experts=True` resident passes and host
  nodes get graphs of their own, so `timed_step` can tell expert time from other GPU work (for benchmarks; the
  split costs a few launches per layer).
* **No per-shape attention graphs.** Every forward here runs with torch's SDPA backends other than cuDNN's
  (`kllama.model.attention.SHAPE_STABLE_BACKENDS`): cuDNN builds an attention graph for each new shape, and prompts
  and packed steps come in every length. On the H200 box a 19-token prompt after a 32-token warm-up waited 0.93 s
  for its first token on a tiny model, 0.92 s of it in `scaled_dot_product_attention`; V2-Lite's waited 1.8 s.
* **Compiled one-sequence steps** (`compile_steps=True`, `decode_compile: true`): the step of batch bucket 1 is
  warmed up and captured with the model's attention, norm and router modules compiled by Inductor
  (`kllama.infer.compiled`); other buckets, prefill and packed steps run them as they are. If compiling fails,
  one line says why and the step is captured without it (`compile_reason`).
* **Clean fallback.** Without CUDA, with `use_graphs=False`, or when a capture fails, steps run eagerly over the same
  cache (one log line says why), so results never depend on whether graphs were used. A failed capture leaves the
  process clean (`graph_capture`): the default CUDA RNG and the allocator work as before. Attention implementations
  other than sdpa and eager (flash-attention takes no 4-D mask) get no decoder: `graphed_decoder` returns None.

A decoder is not thread-safe: one caller steps it (the engine serialises requests).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.attention import sdpa_kernel

from kllama.experts.cpu_compute import HostNodePass, kernel_takes, worker_threads
from kllama.experts.cpu_kernels import handoff_runner, handoff_sequence
from kllama.experts.host_func import host_func_reason, memops_reason
from kllama.experts.module import HostExperts, expert_pass_hook
from kllama.infer.compiled import CompiledDecode
from kllama.infer.graph_capture import end_failed_capture, private_cuda_rng
from kllama.infer.kv_cache import (
    BOOL_MASK_ATTENTION, SlotCache, attention_mask, cache_argument, packed_layout, sliding_window, transformers_model,
)
from kllama.model.attention import SHAPE_STABLE_BACKENDS

logger = logging.getLogger(__name__)

HANDOFFS = ("auto", "flag", "host-node")  # `GraphedDecoder(handoff=)`: auto takes flag where it works
MIN_READ = 256  # shortest read length a step is captured for: short answers share one graph per batch bucket
IDLE = -1  # the position `step` takes for a slot that sits this step out


@dataclass
class StepTimes:
    """Where one decode step's time went (milliseconds): expert passes (GPU graphs of resident passes plus host
    passes), the other GPU work (the remaining graphs), and the host's share of the wall time."""

    wall_ms: float
    expert_ms: float
    other_gpu_ms: float

    @property
    def host_ms(self) -> float:
        """Wall time not spent in GPU work or expert passes: launches, hops between host and device, Python."""
        return max(0.0, self.wall_ms - self.expert_ms - self.other_gpu_ms)


@dataclass
class _Item:
    """One piece of a captured step: a graph (`expert-graph` when it holds only an expert pass) or an eager pass,
    run with the step's count of real rows."""

    run: Callable[[int], None]
    kind: str  # graph | expert-graph | host


# arming a graph's hand-off sequence and launching the graph happen as one, process-wide: the runner serves armed
# sequences in order, so two threads' launches must not cross between an arm and its replay
_HANDOFF_LOCK = threading.Lock()


def _graph_item(graph: torch.cuda.CUDAGraph, kind: str, sequence: object | None = None) -> _Item:
    if sequence is None:
        return _Item(lambda rows: graph.replay(), kind)
    runner = handoff_runner()

    def run(rows: int) -> None:
        with _HANDOFF_LOCK:
            runner.arm(sequence)
            try:
                graph.replay()
            except BaseException:
                runner.cancel()  # the graph never ran: the runner must not wait for its flags
                raise

    return _Item(run, kind)


@dataclass
class _HostPass:
    """An expert pass that cannot be captured, run eagerly on the tensors the previous graph wrote: only the step's
    real rows (one token each), so padding rows cost the CPU nothing and the engine places by the real count."""

    module: HostExperts
    x: Tensor  # [bucket, H]
    index: Tensor  # [bucket, K]
    weights: Tensor  # [bucket, K]
    out: Tensor  # [bucket, H]; padding rows keep whatever they held

    def __call__(self, rows: int) -> None:
        self.out[:rows].copy_(self.module.run_pass(self.x[:rows], self.index[:rows], self.weights[:rows]))


@dataclass
class _Recorder:
    """Captures one step as a chain of graphs, cutting it at expert passes that can be neither captured on the GPU
    nor run as host nodes. `prepare` is the hook of the warm-up forward before a capture: it makes the pinned
    buffers of each pass that will be a host node (`host_nodes`), which a capture cannot allocate."""

    pool: tuple
    split_experts: bool
    host_nodes: bool = True
    spare_core: bool = True
    handoff: str = "host-node"  # how host passes hand over to the CPU (`HostNodePass`): flag | host-node
    items: list[_Item] = field(default_factory=list)
    graph: torch.cuda.CUDAGraph | None = None
    nodes: dict[HostExperts, HostNodePass] = field(default_factory=dict)  # prepared, then captured
    pending: list[HostNodePass] = field(default_factory=list)  # flag hand-offs captured in the open graph

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")

    def end(self, kind: str = "graph") -> None:
        graph, self.graph = self.graph, None
        graph.capture_end()
        pending, self.pending = self.pending, []
        sequence = handoff_sequence([node.job for node in pending], [node.flags for node in pending]) if pending else None
        self.items.append(_graph_item(graph, kind, sequence))

    def abort(self) -> None:
        self.pending = []
        if self.graph is not None:
            graph, self.graph = self.graph, None
            end_failed_capture(graph, self.pool)

    def prepare(self, module: HostExperts, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        if self.host_nodes and module not in self.nodes and host_node_lora(module, x) is not None:
            self.nodes[module] = HostNodePass(module, x, index.shape[1], self.handoff)
        return module.run_pass(x, index, weights)

    def hook(self, module: HostExperts, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        capturable = module.capturable(x.shape[0])
        if capturable and not self.split_experts:
            return module.run_pass(x, index, weights)
        node = self.nodes.get(module)
        if node is not None and node.job is None:
            lora = host_node_lora(module, x)
            if lora is not None:
                return self._host_node(node, x, index, weights, lora)
        self.end()
        if capturable:
            self.begin()
            out = module.run_pass(x, index, weights)
            self.end("expert-graph")
        else:
            out = torch.zeros_like(x)  # outside any capture: a plain allocation that stays where it is
            self.items.append(_Item(_HostPass(module, x, index, weights, out), "host"))
        self.begin()
        return out

    def _host_node(self, node: HostNodePass, x: Tensor, index: Tensor, weights: Tensor,
                   lora: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        cpu_threads = node.module.placement.cpu_threads
        # with a spare core the launching thread waits there, spinning; without, it sleeps (`_Captured.replay`)
        threads = worker_threads(cpu_threads) if self.spare_core else max(1, cpu_threads or torch.get_num_threads())
        if not self.split_experts:
            return self._capture_node(node, x, index, weights, lora, threads)
        self.end()
        self.begin()
        out = self._capture_node(node, x, index, weights, lora, threads)
        self.end("expert-graph")
        self.begin()
        return out


    def _capture_node(self, node: HostNodePass, x: Tensor, index: Tensor, weights: Tensor,
                      lora: Mapping[str, tuple[Tensor, Tensor]], threads: int) -> Tensor:
        out = node.capture(x, index, weights, lora, threads)
        if node.flags is not None:
            self.pending.append(node)
        return out


def host_nodes_reason() -> str | None:
    """None when CPU expert passes can be host nodes of a captured step, else why not (module docstring)."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "active":
        return ("OMP_WAIT_POLICY=active keeps the main thread's OpenMP threads spinning on the cores the host nodes' "
                "kernel needs")
    return host_func_reason()


def host_node_lora(module: HostExperts, x: Tensor) -> Mapping[str, tuple[Tensor, Tensor]] | None:
    """The active expert LoRA's host factors when a no-grad pass of `x` can be a host node (its rows go to the CPU
    kernel, and a frozen LoRA's factors are kept, so a replay reads the ones in use), else None."""
    if x.device.type != "cuda" or module.target_for(x.shape[0]) != "cpu" or host_nodes_reason() is not None:
        return None
    meta, params = module._active_lora()
    if meta and module._lora_key(meta, params) is None:
        return None  # a trainable LoRA's factors are remade at every pass
    lora = module.lora_factors(meta, params, torch.device("cpu"))
    return lora if kernel_takes(module, x, lora) is not None else None


@dataclass
class _Captured:
    items: list[_Item]
    logits: Tensor  # [B, V], written by the last graph
    jobs: list = field(default_factory=list)  # the host nodes' kernel jobs (cpu_kernels.host_job)
    replayed: torch.cuda.Event | None = None  # recorded after each replay of a step with host nodes
    sleep: bool = False  # wait for each replay with host nodes asleep (their jobs took every core)

    def replay(self, rows: int) -> None:
        self.set_rows(rows)
        for item in self.items:
            item.run(rows)
        if self.jobs:
            # a blocking event: its synchronize() sleeps until the step is done, where a copy of the logits would
            # spin on a core the host nodes' kernel uses
            self.replayed = self.replayed or torch.cuda.Event(blocking=True)
            self.replayed.record()
            if self.sleep:
                self.replayed.synchronize()

    def __del__(self) -> None:
        # the host nodes of a replay still in flight run jobs and read buffers that die with this object (a caller
        # may drop a decoder without reading its last step's logits)
        if self.replayed is not None:
            with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone
                self.replayed.synchronize()

    def set_rows(self, rows: int) -> None:
        """Have the host nodes compute the first `rows` rows (after any replay in flight), and raise what a
        previous replay's pass failed with."""
        for job in self.jobs:
            if job.error:
                raise RuntimeError(f"a CPU expert pass of a decode step failed: {job.error}")
        if any(job.rows != rows for job in self.jobs):
            torch.cuda.synchronize(self.logits.device)  # a replay in flight reads the count when its node runs
            for job in self.jobs:
                job.rows = rows

    def timed_replay(self, device: torch.device, rows: int) -> StepTimes:
        self.set_rows(rows)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        expert = other = 0.0
        events = []
        for item in self.items:
            if item.kind == "host":
                torch.cuda.synchronize(device)  # the previous graphs' time is theirs, not this pass's
                begin = time.perf_counter()
                item.run(rows)
                torch.cuda.synchronize(device)
                expert += (time.perf_counter() - begin) * 1e3
                continue
            pair = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            pair[0].record()
            item.run(rows)
            pair[1].record()
            events.append((item.kind, pair))
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) * 1e3
        for kind, (begin, end) in events:
            if kind == "expert-graph":
                expert += begin.elapsed_time(end)
            else:
                other += begin.elapsed_time(end)
        return StepTimes(wall, expert, other)


def power_buckets(low: int, high: int) -> list[int]:
    """`low, 2*low, 4*low, ...` below `high`, then `high` itself (`[high]` when `low >= high`)."""
    sizes, size = [], low
    while size < high:
        sizes.append(size)
        size *= 2
    return [*sizes, high]


class GraphedDecoder:
    """Decode steps, packed steps and prompt reads over a slot cache of `max_batch` slots x `max_len` positions,
    decode steps replayed as CUDA graphs where the device allows (see the module docstring)."""

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, *, use_graphs: bool = True,
                 split_experts: bool = False, host_nodes: bool = True, spare_core: bool = True,
                 handoff: str = "auto", compile_steps: bool = False) -> None:
        if handoff not in HANDOFFS:
            raise ValueError(f"unknown hand-off {handoff!r}; choose one of {', '.join(HANDOFFS)}")
        hf = transformers_model(model)
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        self.split_experts, self.host_nodes, self.spare_core = split_experts, host_nodes, spare_core
        self.handoff = "host-node"  # what host passes use (`HostNodePass`), resolved below for a CUDA model
        self.device, self.dtype = hf.device, hf.dtype
        self.capacity = max_len + 1  # position max_len is the scratch slot of padding rows
        self.cache = SlotCache(hf.config.num_hidden_layers, max_batch, self.capacity)
        self.window = sliding_window(hf.config)
        self._bool_mask = BOOL_MASK_ATTENTION[hf.config._attn_implementation]
        self._cache_kw = cache_argument(hf)
        self._ids = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self._positions = torch.full((max_batch, 1), max_len, dtype=torch.long, device=self.device)
        self._arange = torch.arange(self.capacity, device=self.device)
        self._captured: dict[tuple[int, int], _Captured] = {}
        self._pool: tuple | None = None
        self.captures, self.capture_s = 0, 0.0
        self.reason: str | None = None  # why steps run eagerly; None while graphs are used
        if self.device.type != "cuda":
            self.reason = f"model on {self.device}, CUDA graphs need a CUDA device"
        elif not use_graphs:
            self.reason = "CUDA graphs turned off"
        self.compiled: CompiledDecode | None = None  # one-sequence steps' fused modules (`compiled.py`)
        self.compile_reason: str | None = "not asked for" if not compile_steps else None  # why not compiled
        if compile_steps and self.reason is not None:
            self.compile_reason = "steps run eagerly"
        elif compile_steps:
            self.compiled = CompiledDecode.of(model)
            self.compiled.allow(len(self.read_lengths()))
        if self.reason is not None:
            logger.info("decode steps run eagerly over a static cache: %s", self.reason)
        elif host_nodes and host_nodes_reason() is not None:
            logger.info("CPU expert passes of decode steps run between graphs, not as host nodes: %s",
                        host_nodes_reason())
        elif host_nodes and handoff != "host-node":
            with torch.cuda.device(self.device):
                reason = memops_reason()
            if reason is None:
                self.handoff = "flag"
            else:
                logger.info("CPU expert passes of decode steps are CUDA host nodes, not flag hand-offs: %s", reason)

    @property
    def graphed(self) -> bool:
        """Whether steps are replayed as CUDA graphs."""
        return self.reason is None

    def host_jobs(self) -> list:
        """The kernel jobs of every captured step's host nodes (`cpu_kernels.host_job`: `runs`, `seconds`)."""
        return [job for captured in self._captured.values() for job in captured.jobs]

    def buckets(self) -> list[int]:
        """The batch sizes a step is captured for (a batch runs in the smallest bucket that holds it)."""
        return power_buckets(1, self.max_batch)

    def read_lengths(self) -> list[int]:
        """The read lengths a step is captured for (the smallest above the batch's last position is used)."""
        return power_buckets(min(MIN_READ, self.capacity), self.capacity)

    def allocate(self) -> int:
        """Make every layer's storage now (one eager token at a scratch position) and return its bytes."""
        with torch.inference_mode():
            self._forward_rows(self._ids[:1], self._positions[:1].fill_(self.max_len), slice(0, 1), self.capacity)
        return self.cache.nbytes()

    @torch.inference_mode()
    def capture_buckets(self) -> float:
        """Capture the step of every batch bucket at the shortest read length now (what short answers use), so no
        request waits for those captures; returns the seconds it took (0 when steps run eagerly)."""
        began = time.perf_counter()
        for bucket in self.buckets():
            if self._ensure_captured(bucket, self.read_lengths()[0]) is None:
                return 0.0
        return time.perf_counter() - began

    def _run(self, ids: Tensor, positions: Tensor, allowed: Tensor, keep: int | Tensor) -> Tensor:
        with sdpa_kernel(SHAPE_STABLE_BACKENDS):  # module docstring, "No per-shape attention graphs"
            out = self.model(input_ids=ids, position_ids=positions,
                             attention_mask=attention_mask(allowed, self._bool_mask, self.dtype),
                             use_cache=True, logits_to_keep=keep, **{self._cache_kw: self.cache})
        return out.logits

    def _forward_rows(self, ids: Tensor, positions: Tensor, rows: slice, length: int) -> Tensor:
        """Logits `[B, V]` of the last token of each row of `ids [B, T]` at `positions [B, T]` in slots `rows`,
        attention reading positions `0..length-1`."""
        slots = torch.arange(rows.start, rows.stop, device=self.device)  # [B]
        self.cache.set_rows((slots[:, None] * self.capacity + positions).reshape(-1), rows, length)
        key_pos = self._arange[None, None, None, :length]  # [1, 1, 1, L]
        query_pos = positions[:, None, :, None]  # [B, 1, T, 1]
        allowed = key_pos <= query_pos
        if self.window is not None:
            allowed = allowed & (key_pos > query_pos - self.window)
        allowed = allowed | (query_pos == self.max_len)  # scratch rows see everything: never an all-masked row
        return self._run(ids, positions, allowed, 1)[:, -1]

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor | Sequence[int], slot: int = 0, start: int = 0) -> Tensor:
        """Run `input_ids` (`[P]` or `[1, P]`) eagerly into cache slot `slot` from position `start`; returns the
        logits `[V]` of its last token. Placements decide where its experts run (long prompts may stream)."""
        ids = torch.as_tensor(input_ids, device=self.device).view(1, -1)
        if not 0 <= slot < self.max_batch or start + ids.shape[1] > self.max_len:
            raise ValueError(f"prefill of {ids.shape[1]} tokens at {start} into slot {slot} does not fit "
                             f"{self.max_batch} slots x {self.max_len} positions")
        positions = (start + torch.arange(ids.shape[1], device=self.device))[None]  # [1, P]
        return self._forward_rows(ids, positions, slice(slot, slot + 1), start + ids.shape[1])[0]

    @torch.inference_mode()
    def packed(self, segments: Sequence[tuple[int, int, Sequence[int]]], keep: Sequence[int] | None = None) -> Tensor:
        """One eager forward of several slots' new tokens packed in one row: `segments` = [(slot, start, ids), ...]
        (ids at positions `start..` of that slot); returns the logits `[M, V]` of the last token of the segments
        `keep` (indices into `segments`; default all)."""
        for slot, start, ids in segments:
            if not 0 <= slot < self.max_batch or start + len(ids) > self.max_len:
                raise ValueError(f"{len(ids)} tokens at {start} into slot {slot} do not fit {self.max_batch} slots "
                                 f"x {self.max_len} positions")
        layout = packed_layout([(slot, start, len(ids)) for slot, start, ids in segments], self.capacity,
                               self.device, self.window)
        flat = [token for _, _, ids in segments for token in ids]
        last = layout.last_index
        if keep is not None and len(keep) != len(segments):
            last = last[torch.tensor(list(keep), dtype=torch.long, device=self.device)]
        self.cache.set_packed(layout.write_index, layout.read_index)
        return self._run(torch.tensor([flat], device=self.device), layout.position_ids, layout.allowed, last)[0]

    def _bucket(self, batch: int) -> int:
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"a decode step of {batch} rows does not fit max_batch={self.max_batch}")
        return next(b for b in self.buckets() if b >= batch)

    def _stage(self, input_ids: Tensor | Sequence[int], positions: Tensor | Sequence[int]) -> tuple[int, int, int]:
        """Copy a step's ids and positions (IDLE -> scratch) into the static inputs; (batch, bucket, read length)."""
        ids = torch.as_tensor(input_ids).reshape(-1)
        pos = torch.as_tensor(positions).reshape(-1)
        batch = ids.numel()
        if pos.numel() != batch:
            raise ValueError(f"{batch} input ids but {pos.numel()} positions")
        bucket = self._bucket(batch)
        length = self.capacity
        if pos.device.type == "cpu":
            if int(pos.max()) >= self.max_len:
                raise ValueError(f"position {int(pos.max())} is past max_len={self.max_len}")
            length = next(n for n in self.read_lengths() if n > int(pos.max()))
        pos = torch.where(pos == IDLE, self.max_len, pos)
        self._ids[:batch, 0].copy_(ids)
        self._positions[:batch, 0].copy_(pos)
        self._ids[batch:bucket].zero_()
        self._positions[batch:bucket].fill_(self.max_len)  # padding rows write to the scratch position
        return batch, bucket, length

    @torch.inference_mode()
    def step(self, input_ids: Tensor | Sequence[int], positions: Tensor | Sequence[int]) -> Tensor:
        """One token for each of the first B slots: `input_ids [B]` at `positions [B]` (slot b holds row b; position
        IDLE leaves that slot untouched) -> logits `[B, V]` (a fresh tensor)."""
        batch, bucket, length = self._stage(input_ids, positions)
        captured = self._ensure_captured(bucket, length)
        if captured is None:
            return self._forward_rows(self._ids[:batch], self._positions[:batch], slice(0, batch), length).clone()
        captured.replay(batch)
        return captured.logits[:batch].clone()

    @torch.inference_mode()
    def timed_step(self, input_ids: Tensor | Sequence[int], positions: Tensor | Sequence[int],
                   ) -> tuple[Tensor, StepTimes | None]:
        """`step` with the device synchronised around every piece, returning where the time went (None when steps
        run eagerly). With `split_experts=True` resident expert passes count as expert time too."""
        batch, bucket, length = self._stage(input_ids, positions)
        captured = self._ensure_captured(bucket, length)
        if captured is None:
            return self.step(input_ids, positions), None
        times = captured.timed_replay(self.device, batch)
        return captured.logits[:batch].clone(), times

    def move(self, source: int, target: int, length: int) -> None:
        """Move the first `length` cached positions of slot `source` to slot `target`."""
        self.cache.move(source, target, length)

    def _ensure_captured(self, bucket: int, length: int) -> _Captured | None:
        if self.reason is not None:
            return None
        key = (bucket, length)
        if key not in self._captured:
            began = time.perf_counter()
            try:
                self._captured[key] = self._capture(bucket, length)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
                self.reason = f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                self._captured.clear()
                self._pool = None  # the failed capture gave its share back; never capture into that pool again
                logger.warning("decode steps run eagerly over a static cache: %s", self.reason)
                return None
            self.captures += 1
            self.capture_s += time.perf_counter() - began
        return self._captured[key]

    def _capture(self, bucket: int, length: int) -> _Captured:
        ids, positions = self._ids[:bucket], self._positions[:bucket]
        saved = ids.clone(), positions.clone()
        positions.fill_(self.max_len)  # warm-up and capture write only to the scratch position
        try:
            if self.compiled is not None and bucket == 1:  # compiled.py: one-sequence steps only
                try:
                    with self.compiled.active():
                        return self._capture_at_scratch(bucket, length)
                except Exception as exc:  # noqa: BLE001 - a failed compile falls back to the stock modules
                    self.compiled = None
                    self.compile_reason = f"compiling failed ({_causes(exc)})"
                    self._pool = None  # as after any failed capture: never capture into that pool again
                    logger.warning("decode steps are captured without torch.compile: %s", self.compile_reason)
            return self._capture_at_scratch(bucket, length)
        finally:
            ids.copy_(saved[0])
            positions.copy_(saved[1])

    def _capture_at_scratch(self, bucket: int, length: int) -> _Captured:
        ids, positions, rows = self._ids[:bucket], self._positions[:bucket], slice(0, bucket)
        current, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(current)
        recorder = _Recorder(self._pool, self.split_experts, self.host_nodes, self.spare_core, self.handoff)
        with torch.cuda.stream(side), expert_pass_hook(recorder.prepare):
            for _ in range(1 if self._captured else 2):  # lazy initialisations (cuBLAS workspaces...) happen here
                self._forward_rows(ids, positions, rows, length)
        current.wait_stream(side)
        torch.cuda.synchronize(self.device)
        gc.collect()  # nothing the collector frees may be returned to the allocator in the middle of a capture
        if self._pool is None:
            self._pool = recorder.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(side), private_cuda_rng(side.device):  # a failed capture cannot strand the RNG
            try:
                recorder.begin()
                with expert_pass_hook(recorder.hook):
                    logits = self._forward_rows(ids, positions, rows, length)
                recorder.end()
            except BaseException:
                recorder.abort()
                raise
        current.wait_stream(side)
        hosts = sum(item.kind == "host" for item in recorder.items)
        jobs = [node.job for node in recorder.nodes.values() if node.job is not None]
        logger.info("decode step for %d rows reading %d positions captured as %d CUDA graphs around %d host expert "
                    "passes, with %d CPU expert passes as host nodes", bucket, length, len(recorder.items) - hosts,
                    hosts, len(jobs))
        return _Captured(recorder.items, logits, jobs, sleep=not self.spare_core)


def _causes(exc: BaseException) -> str:
    """`Type: first line` of an exception and of each exception it wraps (torch.compile wraps its backend's)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).strip().splitlines()
        parts.append(f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__)
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return " <- ".join(parts)


def graphed_decoder(model: nn.Module, max_batch: int = 1, max_len: int = 4096, **options: bool | str,
                    ) -> GraphedDecoder | None:
    """A `GraphedDecoder` for `model` (see the module docstring), or None when its attention implementation cannot
    take the decoder's explicit mask (then the caller keeps its own decoding loop). `options`: `use_graphs`,
    `split_experts`, `host_nodes`, `spare_core`, `handoff`, `compile_steps`."""
    implementation = transformers_model(model).config._attn_implementation
    if implementation not in BOOL_MASK_ATTENTION:
        logger.info("no static-cache decoder for attention %r (supported: %s)", implementation,
                    ", ".join(BOOL_MASK_ATTENTION))
        return None
    return GraphedDecoder(model, max_batch, max_len, **options)
