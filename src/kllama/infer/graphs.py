"""Decode steps replayed as CUDA graphs over a static KV cache, with CPU (or streamed) expert passes between graphs.

At batch 1 a decode step of a MoE model is a few thousand small kernels; launched one by one from Python they take
~100 ms on the H200 box while the GPU works for a few ms (benchmarks/NOTES.md). Here one step is captured once per
batch size and replayed: `graphed_decoder(model, max_batch, max_len)` returns a `GraphedDecoder` whose
`prefill(ids, slot)` runs a prompt eagerly into one cache slot and whose `step(ids, positions)` runs one token per
slot and returns the logits.

* **Static cache.** `SlotCache` is a transformers `Cache` of `max_batch` slots x `max_len + 1` positions whose layers
  write each forward's keys/values at the positions the decoder sets and hand attention the whole slot rows, with an
  explicit 4-D mask (position j visible to a token at position p when j <= p; transformers returns a 4-D mask as
  given). The last position is scratch: padding rows of a batch write there and no real token ever sees it.
* **Graphs cut at expert passes that cannot be captured.** While a step is captured, every no-grad expert pass goes
  through `expert_pass_hook`: a pass that runs on the GPU without a host sync (`HostExperts.capturable`: resident
  weights, torch's grouped GEMM) is captured in line; any other (CPU experts, streamed layers) ends the current
  graph, is recorded as an eager call on the captured tensors writing into a static output, and a new graph begins.
  A step is then replayed as graph, pass, graph, pass, ... (one graph when every layer is resident). All graphs of a
  decoder share one memory pool; they are replayed in the order they were captured, which is what makes sharing
  safe. With `split_experts=True` resident passes get graphs of their own, so `timed_step` can tell expert time
  from other GPU work (for benchmarks; the split costs a few launches per layer).
* **Clean fallback.** Without CUDA, with `use_graphs=False`, or when a capture fails, steps run eagerly over the same
  static cache (one log line says why), so results never depend on whether graphs were used. A failed capture
  leaves the process clean (`graph_capture`): the default CUDA RNG and the allocator work as before. Attention
  implementations other than sdpa and eager (flash-attention takes no 4-D mask) get no decoder: `graphed_decoder`
  returns None and the caller keeps its own loop.

A decoder is not thread-safe: one caller steps it (the engine serialises requests).
"""
from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, StaticLayer

from kllama.experts.module import HostExperts, expert_pass_hook
from kllama.infer.batching import cache_argument, transformers_model
from kllama.infer.graph_capture import end_failed_capture, private_cuda_rng
from kllama.infer.kv_cache import BOOL_MASK_ATTENTION

logger = logging.getLogger(__name__)


def attention_mask(allowed: Tensor, bool_mask: bool, dtype: torch.dtype) -> Tensor:
    """The 4-D mask an attention implementation takes: `allowed` itself (sdpa) or additive (eager)."""
    if bool_mask:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class _SlotLayer(StaticLayer):
    """One layer of a SlotCache: keys/values stored as `[slots * capacity, heads, dim]` rows so a forward's tokens
    are written with one `index_copy_` at the cache's write index, read back as `[slots, heads, capacity, dim]`."""

    def __init__(self, cache: "SlotCache") -> None:
        super().__init__(max_cache_len=cache.capacity)
        self._cache = cache

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        slots, capacity = self._cache.max_batch, self.max_cache_len
        self.device = key_states.device
        self.key_rows = key_states.new_zeros(slots * capacity, key_states.shape[1], key_states.shape[3])
        self.value_rows = value_states.new_zeros(slots * capacity, value_states.shape[1], value_states.shape[3])
        self.keys = self.key_rows.view(slots, capacity, *self.key_rows.shape[1:]).transpose(1, 2)
        self.values = self.value_rows.view(slots, capacity, *self.value_rows.shape[1:]).transpose(1, 2)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index = self._cache.write_index  # [B*T] flat (slot * capacity + position)
        self.key_rows.index_copy_(0, index, key_states.transpose(1, 2).reshape(-1, *self.key_rows.shape[1:]))
        self.value_rows.index_copy_(0, index, value_states.transpose(1, 2).reshape(-1, *self.value_rows.shape[1:]))
        rows = self._cache.rows
        return self.keys[rows], self.values[rows]

    def get_seq_length(self) -> int:
        return 0  # positions are always given explicitly


class SlotCache(Cache):
    """Static KV cache of `max_batch` slots x `capacity` positions for every attention layer; `rows` (the slots a
    forward reads) and `write_index` (where its tokens go) are set by the decoder before each forward."""

    def __init__(self, num_layers: int, max_batch: int, capacity: int) -> None:
        self.max_batch, self.capacity = max_batch, capacity
        self.rows = slice(0, max_batch)
        self.write_index: Tensor | None = None
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])


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
    """One piece of a captured step: a graph (`expert` when it holds only an expert pass) or an eager pass."""

    run: Callable[[], None]
    kind: str  # graph | expert-graph | host


@dataclass
class _HostPass:
    """An expert pass that cannot be captured, run eagerly on the tensors the previous graph wrote."""

    module: HostExperts
    x: Tensor
    index: Tensor
    weights: Tensor
    out: Tensor

    def __call__(self) -> None:
        self.out.copy_(self.module.run_pass(self.x, self.index, self.weights))


@dataclass
class _Recorder:
    """Captures one step as a chain of graphs, cutting it at expert passes that cannot be captured."""

    pool: tuple
    split_experts: bool
    items: list[_Item] = field(default_factory=list)
    graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")

    def end(self, kind: str = "graph") -> None:
        graph, self.graph = self.graph, None
        graph.capture_end()
        self.items.append(_Item(graph.replay, kind))

    def abort(self) -> None:
        if self.graph is not None:
            graph, self.graph = self.graph, None
            end_failed_capture(graph, self.pool)

    def hook(self, module: HostExperts, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        capturable = module.capturable(x.shape[0])
        if capturable and not self.split_experts:
            return module.run_pass(x, index, weights)
        self.end()
        if capturable:
            self.begin()
            out = module.run_pass(x, index, weights)
            self.end("expert-graph")
        else:
            out = torch.empty_like(x)  # outside any capture: a plain allocation that stays where it is
            self.items.append(_Item(_HostPass(module, x, index, weights, out), "host"))
        self.begin()
        return out


@dataclass
class _Captured:
    items: list[_Item]
    logits: Tensor  # [B, V], written by the last graph

    def replay(self) -> None:
        for item in self.items:
            item.run()

    def timed_replay(self, device: torch.device) -> StepTimes:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        expert = other = 0.0
        events = []
        for item in self.items:
            if item.kind == "host":
                torch.cuda.synchronize(device)  # the previous graphs' time is theirs, not this pass's
                begin = time.perf_counter()
                item.run()
                torch.cuda.synchronize(device)
                expert += (time.perf_counter() - begin) * 1e3
                continue
            pair = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            pair[0].record()
            item.run()
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


class GraphedDecoder:
    """Prefill and one-token decode steps over a static cache of `max_batch` slots x `max_len` positions, replayed
    as CUDA graphs where the device allows (see the module docstring)."""

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, *, use_graphs: bool = True,
                 split_experts: bool = False) -> None:
        hf = transformers_model(model)
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        self.split_experts = split_experts
        self.device, self.dtype = hf.device, hf.dtype
        self.capacity = max_len + 1  # position max_len is the scratch slot of padding rows
        self.cache = SlotCache(hf.config.num_hidden_layers, max_batch, self.capacity)
        self._bool_mask = BOOL_MASK_ATTENTION[hf.config._attn_implementation]
        self._cache_kw = cache_argument(hf)
        self._ids = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self._positions = torch.full((max_batch, 1), max_len, dtype=torch.long, device=self.device)
        self._arange = torch.arange(self.capacity, device=self.device)
        self._captured: dict[int, _Captured] = {}
        self._pool: tuple | None = None
        self.reason: str | None = None  # why steps run eagerly; None while graphs are used
        if self.device.type != "cuda":
            self.reason = f"model on {self.device}, CUDA graphs need a CUDA device"
        elif not use_graphs:
            self.reason = "CUDA graphs turned off"
        if self.reason is not None:
            logger.info("decode steps run eagerly over a static cache: %s", self.reason)

    @property
    def graphed(self) -> bool:
        """Whether steps are replayed as CUDA graphs."""
        return self.reason is None

    def buckets(self) -> list[int]:
        """The batch sizes a step is captured for (a batch runs in the smallest bucket that holds it)."""
        sizes, size = [], 1
        while size < self.max_batch:
            sizes.append(size)
            size *= 2
        return [*sizes, self.max_batch]

    def _forward(self, ids: Tensor, positions: Tensor, rows: slice) -> Tensor:
        """Logits `[B, V]` of the last token of each row of `ids [B, T]` at `positions [B, T]`, cache slots `rows`."""
        slots = torch.arange(rows.start, rows.stop, device=self.device)  # [B]
        self.cache.rows = rows
        self.cache.write_index = (slots[:, None] * self.capacity + positions).reshape(-1)
        allowed = self._arange[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, capacity]
        out = self.model(input_ids=ids, position_ids=positions,
                         attention_mask=attention_mask(allowed, self._bool_mask, self.dtype),
                         use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache})
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor | Sequence[int], slot: int = 0, start: int = 0) -> Tensor:
        """Run `input_ids` (`[P]` or `[1, P]`) eagerly into cache slot `slot` from position `start`; returns the
        logits `[V]` of its last token. Placements decide where its experts run (long prompts may stream)."""
        ids = torch.as_tensor(input_ids, device=self.device).view(1, -1)
        if not 0 <= slot < self.max_batch or start + ids.shape[1] > self.max_len:
            raise ValueError(f"prefill of {ids.shape[1]} tokens at {start} into slot {slot} does not fit "
                             f"{self.max_batch} slots x {self.max_len} positions")
        positions = (start + torch.arange(ids.shape[1], device=self.device))[None]  # [1, P]
        return self._forward(ids, positions, slice(slot, slot + 1))[0]

    def _bucket(self, batch: int) -> int:
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"a decode step of {batch} rows does not fit max_batch={self.max_batch}")
        return next(b for b in self.buckets() if b >= batch)

    def _stage(self, input_ids: Tensor | Sequence[int], positions: Tensor | Sequence[int]) -> tuple[int, int]:
        ids = torch.as_tensor(input_ids).reshape(-1)
        pos = torch.as_tensor(positions).reshape(-1)
        batch = ids.numel()
        if pos.numel() != batch:
            raise ValueError(f"{batch} input ids but {pos.numel()} positions")
        if pos.device.type == "cpu" and batch and int(pos.max()) >= self.max_len:
            raise ValueError(f"position {int(pos.max())} is past max_len={self.max_len}")
        bucket = self._bucket(batch)
        self._ids[:batch, 0].copy_(ids)
        self._positions[:batch, 0].copy_(pos)
        self._ids[batch:bucket].zero_()
        self._positions[batch:bucket].fill_(self.max_len)  # padding rows write to the scratch position
        return batch, bucket

    @torch.inference_mode()
    def step(self, input_ids: Tensor | Sequence[int], positions: Tensor | Sequence[int]) -> Tensor:
        """One token for each of the first B slots: `input_ids [B]` at `positions [B]` (slot b holds row b) ->
        logits `[B, V]` (a fresh tensor)."""
        batch, bucket = self._stage(input_ids, positions)
        captured = self._ensure_captured(bucket)
        if captured is None:
            return self._forward(self._ids[:batch], self._positions[:batch], slice(0, batch)).clone()
        captured.replay()
        return captured.logits[:batch].clone()

    @torch.inference_mode()
    def timed_step(self, input_ids: Tensor | Sequence[int], positions: Tensor | Sequence[int],
                   ) -> tuple[Tensor, StepTimes | None]:
        """`step` with the device synchronised around every piece, returning where the time went (None when steps
        run eagerly). With `split_experts=True` resident expert passes count as expert time too."""
        batch, bucket = self._stage(input_ids, positions)
        captured = self._ensure_captured(bucket)
        if captured is None:
            return self.step(input_ids, positions), None
        times = captured.timed_replay(self.device)
        return captured.logits[:batch].clone(), times

    def _ensure_captured(self, bucket: int) -> _Captured | None:
        if self.reason is not None:
            return None
        if bucket not in self._captured:
            try:
                self._captured[bucket] = self._capture(bucket)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager steps
                self.reason = f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                self._captured.clear()
                self._pool = None  # the failed capture gave its share back; never capture into that pool again
                logger.warning("decode steps run eagerly over a static cache: %s", self.reason)
                return None
        return self._captured[bucket]

    def _capture(self, bucket: int) -> _Captured:
        ids, positions = self._ids[:bucket], self._positions[:bucket]
        saved = ids.clone(), positions.clone()
        positions.fill_(self.max_len)  # warm-up and capture write only to the scratch position
        try:
            return self._capture_at_scratch(bucket)
        finally:
            ids.copy_(saved[0])
            positions.copy_(saved[1])

    def _capture_at_scratch(self, bucket: int) -> _Captured:
        ids, positions, rows = self._ids[:bucket], self._positions[:bucket], slice(0, bucket)
        current, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisations (cache, resident weights, cuBLAS workspaces) happen here
                self._forward(ids, positions, rows)
        current.wait_stream(side)
        torch.cuda.synchronize(self.device)
        gc.collect()  # nothing the collector frees may be returned to the allocator in the middle of a capture
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        recorder = _Recorder(self._pool, self.split_experts)
        with torch.cuda.stream(side), private_cuda_rng(side.device):  # a failed capture cannot strand the RNG
            try:
                recorder.begin()
                with expert_pass_hook(recorder.hook):
                    logits = self._forward(ids, positions, rows)
                recorder.end()
            except BaseException:
                recorder.abort()
                raise
        current.wait_stream(side)
        hosts = sum(item.kind == "host" for item in recorder.items)
        logger.info("decode step for %d rows captured as %d CUDA graphs around %d host expert passes",
                    bucket, len(recorder.items) - hosts, hosts)
        return _Captured(recorder.items, logits)


def graphed_decoder(model: nn.Module, max_batch: int = 1, max_len: int = 4096, **options: bool,
                    ) -> GraphedDecoder | None:
    """A `GraphedDecoder` for `model` (see the module docstring), or None when its attention implementation cannot
    take the decoder's explicit mask (then the caller keeps its own decoding loop). `options`: `use_graphs`,
    `split_experts`."""
    implementation = transformers_model(model).config._attn_implementation
    if implementation not in BOOL_MASK_ATTENTION:
        logger.info("no static-cache decoder for attention %r (supported: %s)", implementation,
                    ", ".join(BOOL_MASK_ATTENTION))
        return None
    return GraphedDecoder(model, max_batch, max_len, **options)
