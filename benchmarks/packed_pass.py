"""Why a packed (padding-free) DPO micro-step is slower than a padded one on the GPU (issue 11): one probe.

The same 8 pairs (prompt + answer 300-1,200 tokens a sequence, ~12k real tokens) go through kllama's own trainer
(`KllamaTrainer.training_step` on `{"chunks": [batch]}`, as a micro-batched run feeds it: `_dpo_loss`, the
lock-step reference when experts stream, chunked log-probs, backward under non-reentrant checkpointing) once
collated padded and once packed (`PairwiseCollator(packed=...)`), on a full-size model config limited to `--layers`
with routed experts in pinned host memory (`--placements stream|gpu`), LoRA r=8 on `all`.

Modes (`--modes`, a comma list of `MODES`) separate the suspects:
* `padded` / `packed`: the two paths, new sequence lengths every step (as real data has);
* `packed-same-lengths`: the warm-up's batch again every step. cuDNN's attention (torch's default SDPA backend on an
  H200 for V2-Lite's 192/128 head dims) builds and caches one execution plan per exact shape and strides, on the
  host; `per_sequence_sdpa` makes one call per sequence on slices of the packed row, whose key holds the sequence's
  length and the row's total, so a new batch misses for every sequence, forward and backward;
* `packed-efficient` / `padded-efficient`: SDPA held to the memory-efficient kernel (no per-shape graph build);
* `packed-cudnn`: the per-sequence calls with cuDNN's kernel allowed again, i.e. the packed path as it was before
  the fix this probe led to (`kllama.train.packing.PACKED_BACKENDS` leaves cuDNN out): 4.6 s a step against 0.32 s
  on the H200 box, 4 layers. Since that fix `packed` and `packed-efficient` run the same kernels;
* `packed-dense`: transformers' own masked SDPA over the packed row (its N x N block-diagonal mask), no split.

For each mode and layer count: seconds a step (median of `--repeats` after `--warmup`), peak GPU GB, host syncs of
one step (CUDA: `torch.cuda.set_sync_debug_mode("warn")`, with the source lines that caused them), host reads seen
from Python (`.item()`, `.tolist()`, `nonzero`, ... on any device) and the cuDNN plan cache's lookups in that step
(its `TORCH_CUDNN_SDPA_CACHE_DEBUG` lines, where this torch has them), then torch.profiler's top 20 ops by self CUDA
time and by self CPU time over one step (`--trace` also exports a Chrome trace). Prints the tables, writes JSON.

`--layers 4,8` (two or more counts, smallest first, each model freed before the next is built) adds, per mode, the
split of `layer_split.py`: for every op of the profiled step (self CUDA time on a GPU, self CPU time on the CPU) and
for the step's seconds, per layer = the slope of a least-squares line through (layers, ms) and fixed = its
intercept, by op, by op class (attention fwd/bwd, GEMM, elementwise, norms, host->device copies, other) and the
projected full-depth step `fixed + per_layer * num_hidden_layers`. Every count runs the same pairs and warms up on
them (so shape-keyed caches are warm at every count alike; see `run_mode`).

    PYTHONPATH=src python benchmarks/packed_pass.py --layers 4 --placements stream --gpu-cap-gb 24     # ~1 min
    PYTHONPATH=src python benchmarks/packed_pass.py --layers 4,8 --modes packed,padded --budget-s 150  # per layer
    PYTHONPATH=src python benchmarks/packed_pass.py --layers 4 --cudnn-avoid-recompile      # torch's opt-in flag
    PYTHONPATH=src python benchmarks/packed_pass.py --tiny                                  # CPU smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FULL_SHAPES, RESULTS_DIR, build_model, comma_list, compute_device, current_host_gb, environment, format_table,
    gpu_peak_gb, log, model_config, placement_list, release, reset_gpu_peak, set_gpu_cap, shape_summary, synchronize,
    write_results,
)
from dpo_throughput import LORA_RANK, place_experts, prepare_training  # noqa: E402
from layer_split import format_split, layer_splits, op_times  # noqa: E402
from kllama.data.collate import PairwiseCollator, data_tokens, real_tokens  # noqa: E402
from kllama.data.templates import IGNORE_INDEX  # noqa: E402
from kllama.train.lockstep import lockstep_for_run  # noqa: E402
from kllama.train.trainer import KllamaTrainer, PreferenceSettings, causal_lm_of  # noqa: E402


@dataclass(frozen=True)
class Mode:
    """One way to run the step: packed or padded rows, fresh lengths each step or the warm-up's batch again, and the
    SDPA backend (None: torch's default dispatch; `efficient`: the memory-efficient kernel only; `cudnn`: a packed
    row's per-sequence calls may use cuDNN's kernel, as before the fix; CUDA only)."""

    packed: bool
    fresh_lengths: bool = True
    backend: str | None = None
    dense_mask: bool = False  # packed row through transformers' masked sdpa, not kllama's per-sequence split
    shared: bool = False  # packed, each pair's prompt computed once (`prefix_sharing`)
    about: str = ""


MODES: dict[str, Mode] = {
    "padded": Mode(packed=False, about="padded rows, new lengths every step"),
    "packed": Mode(packed=True, about="one packed row, per-sequence sdpa, new lengths every step"),
    "packed-same-lengths": Mode(packed=True, fresh_lengths=False, about="packed, the warm-up's batch every step"),
    "packed-efficient": Mode(packed=True, backend="efficient", about="packed, sdpa held to the efficient kernel"),
    "padded-efficient": Mode(packed=False, backend="efficient", about="padded, sdpa held to the efficient kernel"),
    "packed-cudnn": Mode(packed=True, backend="cudnn", about="packed, per-sequence calls allowed cuDNN (pre-fix)"),
    "packed-dense": Mode(packed=True, dense_mask=True, about="packed, transformers' N x N masked sdpa, no split"),
    "packed-shared": Mode(packed=True, shared=True, about="packed, each pair's prompt computed once (prefix_sharing)"),
}
# the fixed paths first, the pre-fix `packed-cudnn` (seconds a step) last under the time budget
DEFAULT_MODES = "padded,packed,padded-efficient,packed-same-lengths,packed-cudnn"

# Python-level calls that read a tensor's value on the host (a device sync when the tensor is on a GPU)
HOST_READS = frozenset({
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.any, torch.Tensor.all, torch.masked_select, torch.Tensor.masked_select, torch.unique,
    torch.Tensor.unique, torch.repeat_interleave, torch.Tensor.repeat_interleave,
})
PROFILE_COLUMNS = (("name", "op", "{}"), ("self_ms", "self ms", "{:.1f}"), ("calls", "calls", "{}"))
STEP_COLUMNS = (
    ("name", "mode", "{}"), ("placement", "placement", "{}"), ("layers", "layers", "{}"),
    ("real_tokens", "real tok", "{:,}"),
    ("pass_tokens", "pass tok", "{:,}"), ("s_per_step", "s/step (median)", "{:.3f}"), ("s_min", "min", "{:.3f}"),
    ("s_max", "max", "{:.3f}"), ("peak_gpu_gb", "peak GPU GB", "{:.1f}"), ("cuda_syncs", "CUDA syncs", "{}"),
    ("host_reads", "host reads", "{}"), ("cudnn_cache_lookups", "cuDNN lookups", "{}"), ("note", "note", "{}"),
)


def layer_counts(text: str) -> list[int]:
    """A `--layers` value (`4` or `4,8`) as sorted distinct positive counts."""
    try:
        counts = sorted({int(item) for item in comma_list(text)})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want positive layer counts, e.g. 4 or 4,8")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(FULL_SHAPES), default="v2lite")
    p.add_argument("--layers", type=layer_counts, default=[4],
                   help="comma list of layer counts (first N decoder layers of the full-size config); two or more "
                        "add the per layer / fixed split of every mode (smallest count first)")
    p.add_argument("--placements", default="stream", help="comma list of stream|gpu")
    p.add_argument("--gpu-cap-gb", type=float, default=24.0, help="GPU memory cap of `stream` (max_gpu_memory)")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--min-len", type=int, default=300, help="shortest sequence (prompt + answer)")
    p.add_argument("--max-len", type=int, default=1200, help="longest sequence (prompt + answer)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-lockstep", action="store_true", help="the reference as its own no-grad pass when streaming")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler step")
    p.add_argument("--trace", action="store_true", help="also export each profiled step as a Chrome trace")
    p.add_argument("--cudnn-avoid-recompile", action="store_true",
                   help="set TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (torch's opt-in: lengths rounded up to powers of "
                        "two in cuDNN's cache key; only for BSHD-contiguous q/k/v without a mask)")
    p.add_argument("--budget-s", type=float, default=75.0,
                   help="after this many seconds, later modes are skipped and a running one drops its count and "
                        "profile steps (the box's call is held to ~90 s)")
    p.add_argument("--no-cudnn-cache-debug", action="store_true",
                   help="leave TORCH_CUDNN_SDPA_CACHE_DEBUG unset (set by default: the counted step records the "
                        "cuDNN plan cache's lookups and cumulative hit rate, where this torch has the switch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data
def preference_rows(vocab: int, pairs: int, min_len: int, max_len: int, seed: int) -> list[dict[str, list[int]]]:
    """`pairs` tokenized preference rows as the data pipeline yields them: a prompt (no labels, 1/8-1/3 of the
    shorter sequence) shared by a chosen and a rejected answer, each sequence `min_len..max_len` tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(pairs):
        lengths = [rng.randint(min_len, max_len) for _ in range(2)]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(min(lengths) // 8, min(lengths) // 3))]
        row: dict[str, list[int]] = {}
        for side, length in zip(("chosen", "rejected"), lengths):
            answer = [rng.randrange(vocab) for _ in range(length - len(prompt))]
            row[f"{side}_input_ids"] = prompt + answer
            row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
        rows.append(row)
    return rows


def step_batch(rows: list[dict[str, list[int]]], mode: Mode, pad_token_id: int) -> dict[str, Any]:
    """One step's input as a micro-batched run hands it to the trainer: one pass (`chunks`) of kllama's collator."""
    collate = PairwiseCollator(pad_token_id, pad_to_multiple_of=8, packed=mode.packed, share_prompts=mode.shared)
    return {"chunks": [collate(rows)]}


# ----------------------------------------------------------------------------- counting syncs
class HostReadCounter(TorchFunctionMode):
    """Counts Python-level calls that read a tensor's value on the host (`HOST_READS`), by caller location."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in HOST_READS:
            self.sites[f"{_caller()} {getattr(func, '__name__', func)}"] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The innermost frame outside torch and this script: where a host read came from."""
    frame = sys._getframe(2)
    here = str(Path(__file__).resolve())
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and name != here:
            return f"{_short(name)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/src/", "/benchmarks/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


@dataclass
class StepWarnings:
    """What torch reported during one CUDA step: synchronizing calls by the Python line that caused them, and the
    cuDNN attention plan cache's own lines (`TORCH_CUDNN_SDPA_CACHE_DEBUG=1`: one a lookup, cumulative counts)."""

    syncs: Counter = field(default_factory=Counter)
    cudnn_cache: list[str] = field(default_factory=list)


@contextlib.contextmanager
def cuda_warnings(device: torch.device) -> Iterator[StepWarnings]:
    """Inside the block, torch's warnings are collected: every synchronizing CUDA call
    (`torch.cuda.set_sync_debug_mode("warn")`) and the cuDNN cache's debug lines; empty on CPU."""
    seen = StepWarnings()
    if device.type != "cuda":
        yield seen
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        text = str(w.message)
        if "synchroniz" in text:
            seen.syncs[f"{_short(w.filename)}:{w.lineno}"] += 1
        elif "SDPA Cache" in text:
            seen.cudnn_cache.append(text.strip())


# ----------------------------------------------------------------------------- the step
@contextlib.contextmanager
def mode_context(mode: Mode, device: torch.device) -> Iterator[None]:
    """The SDPA backend restriction (CUDA only) and, for `dense_mask`, transformers' sdpa in place of kllama's
    per-sequence split (its `SEQUENCE_BOUNDS` keyword is then ignored by transformers' function)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from kllama.train import packing
    from kllama.train import trainer as trainer_module

    with contextlib.ExitStack() as stack:
        if mode.backend == "efficient" and device.type == "cuda":
            stack.enter_context(sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]))
        if mode.backend == "cudnn":  # the per-sequence calls read this list when they run
            saved_backends = packing.PACKED_BACKENDS
            packing.PACKED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *saved_backends]
            stack.callback(setattr, packing, "PACKED_BACKENDS", saved_backends)
        if mode.dense_mask:
            saved = trainer_module.use_per_sequence_sdpa
            trainer_module.use_per_sequence_sdpa = lambda: None
            ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_attention_forward
            stack.callback(setattr, trainer_module, "use_per_sequence_sdpa", saved)
        yield


def make_trainer(model: nn.Module, lockstep: Any, device: torch.device, work: str) -> KllamaTrainer:
    """kllama's trainer around the LoRA model, with the arguments a run passes that matter to a step (bf16 on CUDA,
    non-reentrant checkpointing already enabled on the model, no reporting)."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=work, per_device_train_batch_size=1, bf16=device.type == "cuda",
                             use_cpu=device.type != "cuda", report_to="none", disable_tqdm=True,
                             remove_unused_columns=False, label_names=["labels"], logging_nan_inf_filter=False)
    trainer = KllamaTrainer(model=model, args=args, settings=PreferenceSettings(), lockstep=lockstep)
    trainer.current_gradient_accumulation_steps = 1  # what `train()` sets before a step: one micro-step a step
    return trainer


def run_step(trainer: KllamaTrainer, model: nn.Module, batch: dict[str, Any], device: torch.device) -> float:
    """One DPO micro-step through the trainer (forward, loss, backward); gradients dropped after. Seconds."""
    synchronize(device)
    start = time.perf_counter()
    trainer.training_step(model, batch)
    synchronize(device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def profile_step(trainer: KllamaTrainer, model: nn.Module, batch: dict[str, Any], device: torch.device,
                 trace_path: Path | None) -> dict[str, Any]:
    """torch.profiler over one step: the top 20 ops by self CUDA time and by self CPU time (ms, calls), and every
    op's self time in the split's metric (`layer_split.op_times`: self CUDA on a GPU, self CPU on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False, with_stack=False, acc_events=True) as prof:
        run_step(trainer, model, batch, device)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    events = list(prof.key_averages())

    field = "self_device_time_total" if hasattr(events[0] if events else None, "self_device_time_total") \
        else "self_cuda_time_total"  # torch renamed it; the old name warns where both exist

    def device_us(event: Any) -> float:
        return float(getattr(event, field, 0) or 0)

    def top(key: Any) -> list[dict[str, Any]]:
        ranked = sorted(events, key=key, reverse=True)[:20]
        return [{"name": e.key, "self_ms": key(e) / 1e3, "calls": e.count} for e in ranked if key(e) > 0]

    return {"self_cuda": top(device_us) if device.type == "cuda" else [],
            "self_cpu": top(lambda e: float(e.self_cpu_time_total)),
            "ops_metric": "self CUDA" if device.type == "cuda" else "self CPU",
            "ops": op_times(list(prof.events()), device)}


def counted_step(trainer: KllamaTrainer, model: nn.Module, batch: dict[str, Any], device: torch.device,
                 ) -> dict[str, Any]:
    """One step with its host syncs counted (CUDA sync debug mode; Python-level host reads), its seconds (slower
    than a timed step: the counting costs) and the log-probs the trainer recorded for it."""
    counter = HostReadCounter()
    start = time.perf_counter()
    with cuda_warnings(device) as seen, counter:  # the step alone: the timing's own synchronize stays outside
        loss = trainer.training_step(model, batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    logged = trainer._stored["train"]  # the same pairs padded or packed must give the same log-probs
    return {"counted_step_s": seconds, "loss": float(loss), "logps_chosen": logged["logps/chosen"][-1],
            "logps_rejected": logged["logps/rejected"][-1],
            "cuda_syncs": sum(seen.syncs.values()) if device.type == "cuda" else None,
            "cuda_sync_sites": dict(seen.syncs.most_common(15)), "host_reads": sum(counter.sites.values()),
            "cudnn_cache_lookups": len(seen.cudnn_cache), "cudnn_cache_last": seen.cudnn_cache[-4:],
            "host_read_sites": dict(counter.sites.most_common(15))}


def run_mode(name: str, mode: Mode, placement: str, model: nn.Module, trainer: KllamaTrainer,
             args: argparse.Namespace, device: torch.device, seed: int) -> dict[str, Any]:
    """Warm-up, timed steps, one sync-counted step and one profiled step of `mode`; one table/JSON row.

    Every mode sees the same pairs: step i's are drawn from `seed + 1 + i`, the warm-up's from `seed`. A padded
    call's shapes never equal a packed one's, so no mode warms another's cuDNN graphs beyond the shared warm-up
    batch; only `packed-same-lengths` repeats a shape step after step. A packed row's per-sequence slices have
    strides that depend on the row's total length, part of cuDNN's cache key with each sequence's length.

    With several layer counts (`args.warm_step_shapes`), every count's step i sees the same pairs, so the counts do
    the same work; shape-keyed caches (cuDNN's plans) would then be cold at the first count and warm after it. So
    each count's warm-up also runs every batch its counted steps will see: the counts compare like with like, and
    the plan builds that new lengths cost (a single-count run measures them) are left out of these rows."""
    config = causal_lm_of(model).config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    warm_rows = preference_rows(config.vocab_size, args.pairs, args.min_len, args.max_len, seed)

    def batch_for(step: int) -> dict[str, Any]:
        rows = preference_rows(config.vocab_size, args.pairs, args.min_len, args.max_len, seed + 1 + step) \
            if mode.fresh_lengths else warm_rows
        return step_batch(rows, mode, pad)

    row: dict[str, Any] = {"name": name, "placement": placement, "about": mode.about,
                           "warmed_step_shapes": args.warm_step_shapes}
    if mode.backend and device.type != "cuda":
        row["note"] = f"{mode.backend} backend forced on CUDA only"
    with mode_context(mode, device):
        for i in range(args.warmup):
            seconds = run_step(trainer, model, step_batch(warm_rows, mode, pad), device)
            log(f"{name} [{placement}]: warm-up {i + 1}/{args.warmup} {seconds:.2f}s")
        if args.warm_step_shapes:
            warm_s = [run_step(trainer, model, batch_for(i), device) for i in range(args.repeats + 2)]
            log(f"{name} [{placement}]: warm-up on the steps' own batches {sum(warm_s):.2f}s")
        reset_gpu_peak(device)
        step_s = []
        for i in range(args.repeats):
            batch = batch_for(i)
            step_s.append(run_step(trainer, model, batch, device))
            log(f"{name} [{placement}, {config.num_hidden_layers} layers]: step {i + 1}/{args.repeats} "
                f"{step_s[-1]:.3f}s ({real_tokens(batch['chunks'][0]):,} real tokens)")
        chunk = batch["chunks"][0]
        row.update(s_per_step=statistics.median(step_s), s_min=min(step_s), s_max=max(step_s), step_s=step_s,
                   peak_gpu_gb=gpu_peak_gb(device), real_tokens=real_tokens(chunk), data_tokens=data_tokens(chunk),
                   pass_tokens=chunk["input_ids"].numel(), pass_shape=list(chunk["input_ids"].shape))
        if time.perf_counter() - args.started > args.budget_s:
            row["note"] = "past the time budget: no sync count, no profile"
            return row
        row.update(counted_step(trainer, model, batch_for(args.repeats), device))
        if not args.no_profile:
            folder = Path(os.environ.get("OUT") or args.out_dir or RESULTS_DIR)
            trace = folder / f"packed_pass_{name}_{placement}_{config.num_hidden_layers}layers.trace.json" \
                if args.trace else None
            row["profile"] = profile_step(trainer, model, batch_for(args.repeats + 1), device, trace)
    return row


def run_placement(placement: str, lm: nn.Module, modules: dict, model: nn.Module, modes: list[str],
                  args: argparse.Namespace, device: torch.device, work: str, seed: int,
                  rows: list[dict[str, Any]], save: Callable[[], Any]) -> None:
    """Place the experts, build the run's trainer (lock-step reference when layers stream) and run every mode on
    pairs drawn from `seed` (a placement of its own: lengths no earlier placement warmed up), adding a row to `rows`
    and saving after each (a run cut off at the time limit still leaves its JSON)."""
    capped = placement == "stream"
    set_gpu_cap(args.gpu_cap_gb if capped else None, device)
    engine, info = place_experts(lm, modules, placement, args, device)
    streamed = sum(1 for m in modules.values() if m.placement.long == "stream")
    lockstep = None if args.no_lockstep else lockstep_for_run(
        causal_lm_of(model), stage="dpo", reference_free=False, precomputed=False, starting_adapter=False,
        streamed_layers=streamed)
    trainer = make_trainer(model, lockstep, device, work)
    layers = causal_lm_of(model).config.num_hidden_layers
    log(f"{placement}: {streamed} streamed MoE layers, lock-step reference {'on' if lockstep else 'off'}, {info}")
    for name in modes:
        if time.perf_counter() - args.started > args.budget_s:
            skip_rows([name], [placement], layers, args, rows, save)
            continue
        try:
            row = run_mode(name, MODES[name], placement, model, trainer, args, device, seed)
        except Exception as exc:  # noqa: BLE001 - one failing mode (a kernel refused, OOM) must not cost the call
            traceback.print_exc()
            log(f"{name} [{placement}]: failed: {type(exc).__name__}: {exc}")
            row = {"name": name, "placement": placement, "note": f"failed: {type(exc).__name__}",
                   "error": f"{type(exc).__name__}: {exc}"}
        row.update(layers=layers, lockstep=lockstep is not None, streamed_layers=streamed)
        rows.append(row)
        save()
        model.zero_grad(set_to_none=True)
        release()
    del trainer, engine
    set_gpu_cap(None, device)


def skip_rows(modes: list[str], placements: list[str], layers: int, args: argparse.Namespace,
              rows: list[dict[str, Any]], save: Callable[[], Any]) -> None:
    """Rows for modes the time budget left out (the table and JSON still say what was asked)."""
    for placement in placements:
        for name in modes:
            log(f"{name} [{placement}, {layers} layers]: skipped, past the {args.budget_s:.0f}s budget")
            rows.append({"name": name, "placement": placement, "layers": layers, "note": "skipped: time budget"})
    save()


def run_layer_count(layers: int, modes: list[str], placements: list[str], args: argparse.Namespace,
                    device: torch.device, work: str, rows: list[dict[str, Any]], save: Callable[[], Any]) -> None:
    """Build the model cut to `layers` decoder layers, run every placement and mode on it (placement i's pairs from
    `seed + 1000 i`: the same pairs at every layer count), then free it before the next count is built (full-size
    MoE layers hold ~1.1 GB of experts each in host memory)."""
    config = model_config(args.model, tiny=args.tiny, layers=layers)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    lm, modules = build_model(config, device, host_experts=True)
    model = prepare_training(lm)
    log(f"{layers} layers built in {time.perf_counter() - start:.1f}s: {len(modules)} MoE layers, attention "
        f"{causal_lm_of(model).config._attn_implementation}, host {current_host_gb():.1f} GB")
    for index, placement in enumerate(placements):
        run_placement(placement, lm, modules, model, modes, args, device, work, args.seed + 1000 * index, rows, save)
    del model, lm, modules
    release()
    log(f"{layers} layers freed: host {current_host_gb():.1f} GB")


def projected_rows(splits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step-table rows of each split's projected full-depth step (`fixed + per_layer * full_layers`)."""
    return [{"name": split["name"], "placement": split["placement"], "layers": f"{split['full_layers']} (projected)",
             "s_per_step": split["step"]["projected_ms"] / 1e3,
             "note": f"fixed {split['step']['fixed_ms'] / 1e3:.3f} s + {split['step']['per_layer_ms'] / 1e3:.4f} s "
                     f"a layer, fit on layers {', '.join(map(str, split['layers']))}"} for split in splits]


def label(row: dict[str, Any]) -> str:
    return f"{row['name']} [{row['placement']}, {row.get('layers', '?')} layers]"


def print_profiles(rows: list[dict[str, Any]]) -> None:
    """Each row's profiler tables and its syncs / host reads by source line."""
    for row in rows:
        for key, title in (("self_cuda", "self CUDA time"), ("self_cpu", "self CPU time")):
            top = row.get("profile", {}).get(key)
            if top:
                print(f"\n== {label(row)}: top {len(top)} ops by {title} (one step) ==")
                print(format_table(top, PROFILE_COLUMNS), flush=True)
        if row.get("cudnn_cache_last"):
            print(f"-- {label(row)}: {row['cudnn_cache_lookups']} cuDNN plan-cache lookups in "
                  f"the counted step, last: {row['cudnn_cache_last'][-1]}", flush=True)
        for key, title in (("cuda_sync_sites", "CUDA syncs"), ("host_read_sites", "host reads from Python")):
            if row.get(key):
                print(f"-- {label(row)}: {title} by source line: "
                      + "; ".join(f"{site} x{n}" for site, n in row[key].items()), flush=True)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.started = time.perf_counter()
    if args.cudnn_avoid_recompile:
        os.environ["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"] = "1"  # read by torch's cuDNN attention at its first call
    if not args.no_cudnn_cache_debug:
        os.environ["TORCH_CUDNN_SDPA_CACHE_DEBUG"] = "1"  # the plan cache says its lookups and hit rate (a warning)
    placements = placement_list(args.placements)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [p for p in placements if p not in ("stream", "gpu")] + [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown placements/modes {bad}; placements: stream, gpu; modes: {', '.join(MODES)}")
    device = compute_device()
    if args.tiny:
        args.pairs, args.min_len, args.max_len = 2, 12, 40
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
        warnings.filterwarnings("ignore", message=".*needs a CUDA compute device.*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*deprecated.*")
    args.cpu_threads = min(16, os.cpu_count() or 1)  # for place_experts (unused by stream/gpu)
    full = model_config(args.model, tiny=args.tiny, layers=None)
    counts = sorted({min(n, full.num_hidden_layers) for n in args.layers})
    args.warm_step_shapes = len(counts) > 1
    dense = getattr(full, "first_k_dense_replace", 0) or 0
    if counts[0] <= dense:
        raise SystemExit(f"--layers {counts[0]}: {args.model}'s first {dense} layer(s) have no routed experts; "
                         f"count at least {dense + 1} layers")
    log(f"model {args.model}{' (tiny)' if args.tiny else ''}: layers {counts} of {full.num_hidden_layers}, "
        f"{args.pairs} pairs of {args.min_len}-{args.max_len} tokens a sequence, device {device}, modes {modes}")
    start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "packed_pass", "model": args.model, "tiny": args.tiny, "layers": counts,
        "full_layers": full.num_hidden_layers, "config": shape_summary(full), "pairs": args.pairs,
        "lengths": [args.min_len, args.max_len], "warmup": args.warmup, "repeats": args.repeats,
        "warmed_step_shapes": args.warm_step_shapes, "gpu_cap_gb": args.gpu_cap_gb, "modes": modes,
        "mode_about": {m: MODES[m].about for m in modes}, "lora": {"rank": LORA_RANK, "target": "all"},
        "cudnn_avoid_recompile": args.cudnn_avoid_recompile, "environment": environment(), "rows": [],
    }
    if device.type == "cuda":
        results["sdpa_backends_enabled"] = {
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "flash": torch.backends.cuda.flash_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn_version": torch.backends.cudnn.version()}
    stem = f"packed_pass_{args.model}{'_tiny' if args.tiny else ''}"

    def save() -> Path:
        return write_results(results, stem, args.out_dir)

    with tempfile.TemporaryDirectory() as work:
        for layers in counts:  # smallest first: what the time budget cuts is the larger counts
            if time.perf_counter() - args.started > args.budget_s:
                skip_rows(modes, placements, layers, args, results["rows"], save)
                continue
            run_layer_count(layers, modes, placements, args, device, work, results["rows"], save)
    results["total_s"] = time.perf_counter() - start
    results["split"] = layer_splits(results["rows"], full.num_hidden_layers)
    print_profiles(results["rows"])
    metric = "self CUDA" if device.type == "cuda" else "self CPU"
    for split in results["split"]:
        print("\n" + format_split(split, metric), flush=True)
    print("\n" + format_table(results["rows"] + projected_rows(results["split"]), STEP_COLUMNS), flush=True)
    path = save()
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
