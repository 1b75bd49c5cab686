"""The CPU target: a routed-experts pass computed next to the host weights, `chunk_size` tokens per call.

Training passes (a backward follows) run `routed.py`'s math, shared with the GPU targets, on host copies of their
inputs. No-grad passes (decode, prefill, reference passes) run `cpu_infer_forward`, the same math written for a few
tokens: up to 64 tokens with bf16, int8 or fp8 weights and SiLU it is one call of the C++ kernel (`cpu_kernels.py`:
both matrix stages fused over all selected experts, no GIL, near memory bandwidth); otherwise rows are grouped by
expert without a sort, each selected expert's weights are read once by two GEMMs (bf16 through
oneDNN's `linear`, which picks AMX, AVX-512 or AVX2 kernels; quantized ones through `quant_compute`), and the top-k
rows of a token are summed in fp32 and rounded once. A no-grad pass costs
the device one wait: its inputs go to pinned host buffers with non-blocking copies followed by one stream sync, and
the output goes back with a non-blocking copy. The pass runs with the placement's `cpu_infer` intra-op threads.

A pass the kernel takes whole (decode: `kernel_pass`) goes the shortest way, since on the H200 box the hop around
the kernel cost ~0.5 ms a layer next to the kernel's 0.6-0.95 ms: pinned buffers made once per module and pass shape
(x, routing, and the output the kernel writes in x's dtype), three copies in, one wait for them, one kernel call, one
copy out, and no autograd Function (`HostExperts.run_pass` skips it when nothing needs a gradient). A pinned output
buffer is rewritten only after its previous copy to the device is done (an event recorded after that copy).

Where the MoE block calls its shared experts after the routed ones (DeepSeek), the pass enqueues them on the GPU
right after handing over to the CPU (`shared_overlap.SharedOverlap.launch`), so they run while the kernel does.

A captured decode step takes the same pass without Python at all: `HostNodePass` puts the copies and the kernel
(run by the CUDA driver's thread as a host function) into the step's graph (`kllama.infer.graphs`).
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.functional import linear

from kllama.experts.cpu_kernels import KERNEL_MAX_TOKENS, expert_layer, host_job, kernel_runs, kernel_status
from kllama.experts.host_func import device_address, launch_host_func, wait_value, write_value
from kllama.experts.pinned import host_empty
from kllama.experts.quant import BLOCK, ExpertWeight, QuantizedWeight
from kllama.experts.quant_compute import quant_expert_gemm
from kllama.experts.routed import PassExecutor, SavedPass, token_chunks

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kllama.experts.module import HostExperts

# (token, slot) rows up to which experts are grouped in Python (no sort, no device ops): decode and small batches
_SMALL_ROWS = 512
# Tokens up to which a no-grad pass over int8/fp8 experts runs the C++ kernel in 64-token calls instead of torch's
# loop. The loop dequantizes each selected expert in torch (measured on the H200 box, V2-Lite, `expert_placement: cpu`:
# a 128-token prefill took 4.9-6.2 s with int8 and 19.2 s with fp8 experts, against 1.1-1.5 s for bf16 through
# oneDNN); a kernel call reads the layer's selected experts once (~0.55 GB, ~11 ms at ~50 GB/s) for 64 tokens, so
# 512 tokens cost ~8 layer reads, still far below the loop. Longer passes are compute-bound and stream to the GPU
# under `auto` (its crossover is 24-33 tokens with quantized experts).
QUANT_KERNEL_MAX_TOKENS = 512


@contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with `num_threads` intra-op threads, restoring the previous count (the setting is global)."""
    if num_threads is None or num_threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def worker_threads(cpu_threads: int | None) -> int:
    """Intra-op threads of a CPU pass that runs beside a main thread launching GPU work (a split pass's CPU side):
    one fewer than the placement's `cpu_threads` (or torch's count), so the launch queue keeps a core."""
    return max(1, (cpu_threads or torch.get_num_threads()) - 1)


def expert_groups(top_k_index: Tensor) -> list[tuple[int, Tensor]]:
    """`top_k_index [T, K]` (host) -> `[(expert, rows)]`, rows being the flat `(token * K + slot)` indices routed to
    that expert, in ascending expert order (experts without rows are left out)."""
    flat = top_k_index.reshape(-1)
    if flat.numel() <= _SMALL_ROWS:
        groups: dict[int, list[int]] = {}
        for row, expert in enumerate(flat.tolist()):
            groups.setdefault(expert, []).append(row)
        return [(expert, torch.tensor(rows)) for expert, rows in sorted(groups.items())]
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    return list(zip(experts.tolist(), order.split(counts.tolist())))


def expert_gemm(x: Tensor, weight: Tensor) -> Tensor:
    """`x [n, in] @ weight [out, in]^T -> [n, out]` through torch's `linear` (oneDNN).

    Of the torch forms measured reading weights from DRAM on the H200 box (docs/design.md, "CPU expert pass"),
    `linear` was the fastest (61 % of the read bandwidth at one row; `torch.mv` 36 %). An earlier version timed the
    forms on the first call and kept the fastest, but it timed one weight that sits in the L3 cache, which picked
    `torch.mv`, the slowest form from DRAM."""
    return linear(x, weight)


def expert_product(x: Tensor, weights: ExpertWeight, expert: int) -> Tensor:
    """`x [n, in] @ weights[expert]^T -> [n, out]`: `expert_gemm` for plain weights, `quant_compute` for quantized."""
    if isinstance(weights, QuantizedWeight):
        return quant_expert_gemm(x, weights, expert)
    return expert_gemm(x, weights[expert])


def expert_output(
    xe: Tensor,
    row_weights: Tensor,
    gate_up: ExpertWeight,
    down: ExpertWeight,
    expert: int,
    act_fn: Callable[[Tensor], Tensor],
    gate_up_lora: tuple[Tensor, Tensor] | None = None,
    down_lora: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """One expert's rows through the torch path: `xe [n, H]` and `row_weights [n, 1]` in the weights' dtype ->
    `[n, H]`: gate/up GEMM (+ LoRA), `act(gate) * up` times the routing weight, down GEMM (+ LoRA); LoRA factors
    per expert `(a [E, r, in], b [E, out, r])`."""
    inter = down.shape[-1]
    hidden = expert_product(xe, gate_up, expert)  # [n, 2I]
    if gate_up_lora is not None:
        hidden = hidden + linear(linear(xe, gate_up_lora[0][expert]), gate_up_lora[1][expert])
    act = act_fn(hidden[:, :inter]) * hidden[:, inter:]  # [n, I]
    act = act * row_weights
    y = expert_product(act, down, expert)  # [n, H]
    if down_lora is not None:
        y = y + linear(linear(act, down_lora[0][expert]), down_lora[1][expert])
    return y


def kernel_operands(gate_up: ExpertWeight, down: ExpertWeight) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
    """The weights as the C++ kernel takes them: plain tensors, or QuantizedWeights of one scheme as their values plus
    `gate_up_scale` / `down_scale` (int8: per output row; fp8: 128x128 blocks, gate_up on a grid per projection);
    None for what the kernel does not read (mixed schemes, an fp8 gate_up on one grid where two differ)."""
    if isinstance(gate_up, QuantizedWeight) and isinstance(down, QuantizedWeight):
        if gate_up.scheme != down.scheme or (gate_up.scheme == "fp8" and not _fp8_grids_fit(gate_up, down)):
            return None
        return gate_up.data, down.data, {"gate_up_scale": gate_up.scale, "down_scale": down.scale}
    if isinstance(gate_up, QuantizedWeight) or isinstance(down, QuantizedWeight):
        return None
    return gate_up, down, {}


def _fp8_grids_fit(gate_up: QuantizedWeight, down: QuantizedWeight) -> bool:
    # the kernel reads gate_up's scales as two block grids (gate rows, up rows) and down's as one; a one-grid gate_up
    # is the same layout when the width is a whole number of blocks
    return down.projections == 1 and (gate_up.projections == 2 or down.shape[-1] % BLOCK == 0)


def cpu_infer_forward(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: ExpertWeight,
    down: ExpertWeight,
    act_fn: Callable[[Tensor], Tensor],
    lora: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    *,
    use_kernel: bool = True,
) -> Tensor:
    """No-grad routed-experts layer on host tensors: `x [T, H]`, `top_k_index [T, K]`, `top_k_weights [T, K]`,
    `gate_up [E, 2I, H]`, `down [E, H, I]` -> `[T, H]` in x's dtype. Same math as `routed.experts_forward` (routing
    weight applied to the activation in the weights' dtype, top-k rows summed in fp32); `lora` maps a projection
    to its per-expert factors `(a [E, r, in], b [E, out, r])` with the scaling folded into b.

    A pass the C++ kernel takes (`cpu_kernels.kernel_runs`: up to 64 tokens, bf16/int8/fp8 weights, SiLU) runs there
    in one call, unless `use_kernel` is False; quantized weights take passes of up to `QUANT_KERNEL_MAX_TOKENS`
    there too, in 64-token calls; the rest runs the torch loop below."""
    operands = kernel_operands(gate_up, down) if use_kernel else None
    num_tokens = x.shape[0]
    spans = [slice(0, num_tokens)]
    if operands is not None and isinstance(gate_up, QuantizedWeight) and num_tokens <= QUANT_KERNEL_MAX_TOKENS:
        spans = token_chunks(num_tokens, KERNEL_MAX_TOKENS)
    if operands is not None and kernel_runs(operands[0], operands[1], act_fn, spans[0].stop - spans[0].start, lora):
        gate_up_values, down_values, scales = operands
        outs = [expert_layer(x[s], top_k_index[s], top_k_weights[s], gate_up_values, down_values, lora=lora,
                             **scales) for s in spans]
        return torch.cat(outs).to(x.dtype)
    dtype = gate_up.dtype
    num_tokens, top_k = top_k_index.shape
    lora = lora or {}
    gate_up_lora, down_lora = lora.get("gate_up_proj"), lora.get("down_proj")
    xw = x.to(dtype)
    weights = top_k_weights.reshape(-1, 1).to(dtype)  # [T*K, 1]
    out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32)
    for expert, rows in expert_groups(top_k_index):
        tokens = rows // top_k  # [n]
        xe = xw if num_tokens == 1 else xw.index_select(0, tokens)  # [n, H]
        y = expert_output(xe, weights.index_select(0, rows), gate_up, down, expert, act_fn, gate_up_lora, down_lora)
        out.index_add_(0, tokens, y.float())
    return out.to(x.dtype)


def stage_to_host(*tensors: Tensor) -> list[Tensor]:
    """Host copies of device `tensors` through pinned buffers, with one stream sync for all of them (no copy for
    tensors already on the host)."""
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return hosts


def stage_to_device(out: Tensor, device: torch.device) -> Tensor:
    """`out` (host) on `device`, through a pinned buffer and a non-blocking copy (no wait)."""
    if device.type == "cpu":
        return out
    pinned = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    pinned.copy_(out)
    return pinned.to(device, non_blocking=True)


@dataclass
class _Staging:
    """Pinned host buffers of one module's kernel passes of one shape (reused pass after pass)."""

    x: Tensor  # [T, H] in x's dtype
    index: Tensor  # [T, K] int64
    weights: Tensor  # [T, K] float32
    out: Tensor  # [T, H] in x's dtype, written by the kernel
    copied: torch.cuda.Event  # recorded after the copy out of `out` to the device
    arrived: torch.cuda.Event  # recorded after the copies in (the pass waits on it, not on later shared experts)

    @classmethod
    def make(cls, x: Tensor, top_k: int) -> _Staging:
        num_tokens, hidden = x.shape
        return cls(torch.empty(num_tokens, hidden, dtype=x.dtype, pin_memory=True),
                   torch.empty(num_tokens, top_k, dtype=torch.long, pin_memory=True),
                   torch.empty(num_tokens, top_k, dtype=torch.float32, pin_memory=True),
                   torch.empty(num_tokens, hidden, dtype=x.dtype, pin_memory=True), torch.cuda.Event(),
                   torch.cuda.Event())


# module -> {(tokens, top_k, x's dtype, device, thread): staging}; a thread key, so passes of one module on two
# threads never share a buffer
_STAGING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_KERNEL_OUT_DTYPES = (torch.bfloat16, torch.float32)  # the dtypes the kernel writes its output in


def _staging(module: "HostExperts", x: Tensor, top_k: int) -> _Staging:
    buffers = _STAGING.get(module)
    if buffers is None:
        buffers = _STAGING[module] = {}
    key = (x.shape[0], top_k, x.dtype, x.device, threading.get_ident())
    stage = buffers.get(key)
    if stage is None:
        stage = buffers[key] = _Staging.make(x, top_k)
    return stage


def kernel_pass(
    module: "HostExperts",
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    lora: Mapping[str, tuple[Tensor, Tensor]],
) -> Tensor | None:
    """A no-grad pass the C++ kernel takes in one call (up to `KERNEL_MAX_TOKENS` tokens, bf16 or fp32 `x`), the
    shortest way to and from the device (module docstring): `x [T, H]`, `top_k_index [T, K]`, `top_k_weights
    [T, K]` on any device -> `[T, H]` on x's device in x's dtype, equal to `cpu_infer_forward`'s result. None (having
    done nothing) when the kernel does not take the pass. Run it with the placement's threads (`intra_op_threads`)."""
    operands = kernel_takes(module, x, lora)
    if operands is None:
        return None
    gate_up, down, scales = operands
    overlap = module.shared_overlap
    if x.device.type == "cpu":
        if overlap is not None:
            overlap.launch()  # nothing to overlap on the host, but the block's call then finds it done
        out = torch.empty(x.shape, dtype=x.dtype)
        return expert_layer(x, top_k_index, top_k_weights, gate_up, down, lora=lora, out=out, **scales)
    stage = _staging(module, x, top_k_index.shape[1])
    stage.copied.synchronize()  # the previous pass's copy out of `stage.out` is done (its inputs were read then too)
    stage.x.copy_(x, non_blocking=True)
    stage.index.copy_(top_k_index, non_blocking=True)
    stage.weights.copy_(top_k_weights, non_blocking=True)
    stream = torch.cuda.current_stream(x.device)
    if overlap is not None:  # the GPU computes the block's shared experts while the kernel runs
        stage.arrived.record(stream)
        overlap.launch()
        stage.arrived.synchronize()
    else:
        stream.synchronize()
    expert_layer(stage.x, stage.index, stage.weights, gate_up, down, lora=lora, out=stage.out, **scales)
    result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    result.copy_(stage.out, non_blocking=True)
    stage.copied.record(stream)
    return result


def kernel_takes(module: "HostExperts", x: Tensor, lora: Mapping[str, tuple[Tensor, Tensor]],
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
    """The kernel's operands (`kernel_operands`) when it takes a no-grad pass of `x`'s rows and dtype in one call,
    else None."""
    if x.dtype not in _KERNEL_OUT_DTYPES:
        return None
    operands = kernel_operands(*module.host_weights())
    if operands is None or not kernel_runs(operands[0], operands[1], module.act_fn, x.shape[0], lora):
        return None
    return operands


class HostNodePass:
    """A module's kernel pass inside a CUDA graph (`kllama.infer.graphs`): made outside the capture (pinned buffers
    cannot be allocated inside one), then `capture` enqueues, on the capturing stream, copies of x and the routing
    into those buffers, the hand-off of the kernel to the CPU, and the copy of its output back. Each replay then runs
    the pass in order with the graph's other work, with no stream sync and no Python between layers; `job.rows` sets
    how many leading rows the next replays compute (the rest keep what they held).

    Two hand-offs (`handoff`):
    * `flag`: the graph writes 1 into the pass's `go` word in page-locked memory and waits until its `done` word is 1
      (stream memory operations, `host_func.write_value` / `wait_value`), then sets it back to 0; the process's
      `HandoffRunner` thread spins on `go` while the step is in flight, runs the job and writes `done`
      (`cpu_kernels.handoff_runner`). The graph's replays must arm the pass's sequence (`graphs.py` does). The
      block's shared experts (`shared_overlap.py`) are captured between the go and the wait, so the GPU computes
      them while the CPU computes the routed experts.
    * `host-node`: the kernel as a CUDA host function (`cpu_kernels.host_job`, run by the driver's thread; no Python
      and no GIL at replay). On the H200 box this cost ~64 us a layer where the flag cost ~9 (benchmarks/NOTES.md,
      nineteenth session); it is the fallback where stream memory operations do not work."""

    def __init__(self, module: "HostExperts", x: Tensor, top_k: int, handoff: str = "host-node") -> None:
        self.module = module
        self.handoff = handoff
        # this pass's own buffers, read by the job at every replay; page-locked by registration, not by torch's
        # caching host allocator, which would record an event on its blocks at each copy inside the capture
        num_tokens, hidden = x.shape
        self.stage = _Staging(_locked((num_tokens, hidden), x.dtype), _locked((num_tokens, top_k), torch.long),
                              _locked((num_tokens, top_k), torch.float32), _locked((num_tokens, hidden), x.dtype),
                              torch.cuda.Event(), torch.cuda.Event())
        # go, done: torch's page-locked allocation, mapped for the device on every UVA system (a registered buffer
        # need not be); the graph only writes and waits on it, never copies
        self.flags = torch.zeros(2, dtype=torch.int32, pin_memory=True) if handoff == "flag" else None
        self.flag_address = device_address(self.flags) if self.flags is not None else 0
        self.job: object | None = None

    def capture(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                lora: Mapping[str, tuple[Tensor, Tensor]], threads: int) -> Tensor:
        """Enqueue the pass on x's current (capturing) stream; returns its output on x's device, in x's dtype."""
        gate_up, down, scales = kernel_takes(self.module, x, lora)
        stage = self.stage
        self.job = host_job(stage.x, stage.index, stage.weights, gate_up, down, out=stage.out, threads=threads,
                            lora=lora, **scales)
        stage.x.copy_(x, non_blocking=True)
        stage.index.copy_(top_k_index, non_blocking=True)
        stage.weights.copy_(top_k_weights, non_blocking=True)
        stream = torch.cuda.current_stream(x.device)
        if self.flags is not None:
            write_value(stream, self.flag_address, 1)  # go, after the copies (the write fences them)
            if self.module.shared_overlap is not None:  # the block's shared experts, while the CPU works
                self.module.shared_overlap.launch()
            wait_value(stream, self.flag_address + 4, 1)  # done
            write_value(stream, self.flag_address + 4, 0)
        else:
            launch_host_func(stream, kernel_status().module.host_job_callback(), self.job.address)
        result = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        result.copy_(stage.out, non_blocking=True)
        return result


def _locked(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A zero-filled page-locked host tensor of `shape` (`pinned.host_empty`, small pages)."""
    return host_empty(shape[0] * shape[1], dtype, pin=True, huge=False).view(shape)


class CpuExecutor(PassExecutor):
    """Runs a HostExperts pass on the CPU: inputs move to host, `chunk_size` tokens per call, output moves back."""

    def device(self, module: "HostExperts") -> torch.device:
        return torch.device("cpu")

    def weights(self, module: "HostExperts", num_tokens: int, backward: bool, training: bool) -> tuple[Tensor, Tensor]:
        return module.dense_host_weights()

    def context(self, module: "HostExperts") -> AbstractContextManager:
        return intra_op_threads(module.placement.cpu_threads)

    def forward(
        self,
        module: "HostExperts",
        x: Tensor,
        top_k_index: Tensor,
        top_k_weights: Tensor,
        lora_meta: "Sequence[tuple[str, float]]",
        lora_params: "Sequence[Tensor]",
        keep: bool,
    ) -> tuple[Tensor, SavedPass | None]:
        if keep:
            return super().forward(module, x, top_k_index, top_k_weights, lora_meta, lora_params, keep)
        factors = module.lora_factors(lora_meta, lora_params, torch.device("cpu"))
        with self.context(module):
            out = kernel_pass(module, x.detach(), top_k_index, top_k_weights.detach(), factors)
        if out is not None:
            return out, None
        xh, index, weights = stage_to_host(x.detach(), top_k_index, top_k_weights.detach())
        gate_up, down = module.host_weights()
        spans = self.chunks(module, xh.shape[0])
        with torch.no_grad(), self.context(module):
            if len(spans) == 1:  # decode and short inputs: no slicing ops on the per-layer path
                out = cpu_infer_forward(xh, index, weights, gate_up, down, module.act_fn, factors)
            else:
                outs = [cpu_infer_forward(xh[s], index[s], weights[s], gate_up, down, module.act_fn, factors)
                        for s in spans]
                out = torch.cat(outs) if outs else torch.zeros_like(xh)
        return stage_to_device(out, x.device), None
