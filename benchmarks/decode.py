"""Batch-1 decode speed of a DeepSeek-V2-Lite-shaped random model: where the experts run, with and without CUDA graphs.

    PYTHONPATH=src python benchmarks/decode.py                       # auto, cpu, gpu (eager + graphs), gpu under 24GB
    PYTHONPATH=src python benchmarks/decode.py --placements auto --caps 24GB,40GB
    PYTHONPATH=src python benchmarks/decode.py --placements cpu --caps '' --expert-dtype bf16,int8,fp8,int4

Rows (one model build, random weights, a `--prompt`-token prompt, then `--new` greedy tokens):
* `auto`: the default placement (CPU below the measured inference crossover, streamed above), decode steps through
  `kllama.infer.graphs` (graphs cut around the CPU expert passes); also times the prefill of a `--long-prompt`-token
  prompt, which streams every layer with the CPU taking `k` of each layer's experts (`CPU experts` column: the
  start-up cost model's k; `--cpu-experts 0,6,8,10` times the prefill again with each k forced, JSON
  `prefill_long_forced_s`); each timed prefill logs its split trace (`kllama.experts.split_trace`: the CPU side's ms
  an expert, the gap between layers, to check the cost model's constants), JSON `prefill_long_trace` /
  `prefill_long_forced_trace`.
* `cpu`: every layer's experts on the CPU, graphed the same way.
* `gpu`: every layer resident, once eagerly with transformers' own loop (dynamic cache) and once as one CUDA graph.
* `gpu under <cap>` (one row per `--caps` entry): `auto` plus as many layers resident as the cap allows with an
  inference reserve (`max_gpu_memory`), the rest on the CPU in the same step.
* `auto, GPU filled` (one row per `--fill` fraction): what `kllama chat` / `api` do without `max_gpu_memory`:
  `auto` layers made resident while `gpu_memory_utilization` x the card allows (`fill_gpu_memory`), with the
  `--long-prompt` prefill timed as in the `auto` row.
Each row splits its ms/token into expert passes, other GPU work and host overhead: graphed rows from timed replays
with expert passes in graphs of their own (`split_experts`), the eager row from torch.profiler kernel times. For
CPU passes run as host nodes of the step's graph, `of it kernel` is the kernel's own time inside them (the jobs'
clocks). `--host-nodes on,off` repeats every graphed cpu/auto row with CPU passes as eager calls between graphs
(the way before host nodes), the baseline of the same run; `flag` and `host-node` pick how a captured pass hands over
to the CPU (`GraphedDecoder(handoff=...)`: a flag in page-locked memory answered by a spinning thread, or a CUDA host
function; `on` takes the decoder's default, the flag where stream memory operations work). `--kernel-loop N` then runs the step's kernel jobs back
to back N rounds on the main thread: their ms a layer there next to inside decode (JSON).
`--spare-core on,off` repeats every row with host nodes: `on` (the decoder's default) runs their kernel on the
placement's threads minus one while the replaying thread spins on the core left over, `off` on all threads while it
sleeps (`GraphedDecoder(spare_core=...)`).
`--shared-overlap off` leaves a DeepSeek block's shared experts to the block, after its CPU pass, instead of computing
them on the GPU during it (`kllama.experts.shared_overlap`); `on,off` compares both under `--interleave`.
`--compile on` captures one-sequence steps with the attention, norm and router modules compiled by torch.compile
(`decode_compile: true`, `kllama.infer.compiled`); `on,off` compares both under `--interleave` (rows record each
decoder's capture seconds, the first compiled one including the compile).
`--timeline` (with `--interleave` and flag hand-offs) splits each row's token from the hand-off thread's clock: the
CPU passes, the GPU work between two passes of a token, and what lies between the last pass of one token and the
first of the next (JSON `timeline`, medians over rounds).
`--expert-dtype bf16,int8,fp8,int4` repeats every row with the routed experts held in each dtype (one model build each,
bf16 = not quantized; crossovers measured per dtype).
`--interleave N` measures decode speed the way two kernels are compared in `cpu_gemv.py --compare-source`: every
dtype's model is built and kept, one decoder is captured for each dtype x `--host-nodes` x `--spare-core` x
`--shared-overlap` x `--compile` variant of the one `--placements` entry, and N rounds each decode `--new` tokens
with every variant (in an order rotated each round). A row per variant gives the median of its rounds' tok/s
(and, with host nodes, `of it kernel`: the kernel's own ms a token over all rounds, from the jobs' clocks), and
`x base` the median (min-max) of its rounds' ratio to the base variant of the same round: the bf16 variant with the same other settings (a bf16
variant's base is the first bf16 variant; without bf16 in `--expert-dtype`, the first dtype). On the H200 boxes one
row's tokens ran 30-45 % apart in speed, in stretches of several tokens (the box's speed drifts), so a ratio of two
rows timed one after the other, seconds apart, moved with the drift; neighbouring rounds of a second or two each see
about the same drift. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    build_model, comma_list, compute_device, current_host_gb, environment, expert_dtype_list, format_table,
    gpu_peak_gb, log, model_config, node_split_text, peak_host_gb, placement_list, process_gb_by_node, release,
    reset_gpu_peak, set_gpu_cap, shape_summary, synchronize, write_results,
)
from kllama.config.units import parse_bytes  # noqa: E402
from kllama.experts.cpu_kernels import handoff_runner  # noqa: E402
from kllama.experts.cpu_share import SplitModel  # noqa: E402
from kllama.experts.crossover import NEVER, measure_crossovers, measurement_note  # noqa: E402
from kllama.experts.install import ExpertEngine, wire_engine  # noqa: E402
from kllama.experts.module import HostExperts, expert_pass_hook  # noqa: E402
from kllama.experts.placement import ExpertPlacement  # noqa: E402
from kllama.experts.quant import scheme_of  # noqa: E402
from kllama.experts.split_trace import summarize, traced_split  # noqa: E402
from kllama.infer.batching import cache_argument, transformers_model  # noqa: E402
from kllama.infer.graphs import GraphedDecoder  # noqa: E402
from kllama.model.engine_setup import fill_gpu_memory, inference_reserve_bytes, promote_resident_layers  # noqa: E402

DECODE_COLUMNS = (
    ("name", "run", "{}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.2f}"),
    ("ms_per_token", "ms/token", "{:.1f}"),
    ("expert_ms", "expert ms", "{:.1f}"),
    ("host_node_kernel_ms", "of it kernel", "{:.1f}"),
    ("other_gpu_ms", "other GPU ms", "{:.1f}"),
    ("host_ms", "host ms", "{:.1f}"),
    ("prefill_s", "prefill s", "{:.3f}"),
    ("prefill_long_s", "long prefill s", "{:.3f}"),
    ("prefill_long_cpu_experts", "CPU experts", "{}"),
    ("resident_layers", "resident", "{}"),
    ("peak_gpu_gb", "peak GPU GB", "{:.1f}"),
    ("x_base_text", "x base (min-max)", "{}"),
    ("note", "note", "{}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("v2lite", "qwen3-30b", "qwen3-235b"), default="v2lite")
    p.add_argument("--placements", default="auto,cpu,gpu", help="comma list of auto|cpu|gpu|stream")
    p.add_argument("--caps", default="24GB", help="comma list of GPU memory caps, one mixed row each ('' = none)")
    p.add_argument("--fill", default="", help="comma list of gpu_memory_utilization fractions, one `auto, GPU filled` "
                                              "row each ('' = none)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager gpu row")
    p.add_argument("--kernel-loop", type=int, default=0, help="after each row with host nodes, run the step's kernel "
                   "jobs back to back this many rounds on the main thread: ms a layer there vs inside decode")
    p.add_argument("--host-nodes", default="on", help="comma list of on|off|flag|host-node: graphed cpu/auto rows "
                   "with the CPU expert passes inside the step's graph (on: the decoder's default hand-off; flag or "
                   "host-node: that hand-off) or as eager passes between graphs (off)")
    p.add_argument("--spare-core", default="on", help="comma list of on|off: host nodes' kernel on the placement's "
                   "threads minus one, the replaying thread spinning on the spare core (on), or on all of them, the "
                   "replaying thread asleep (off)")
    p.add_argument("--shared-overlap", default="on", help="comma list of on|off: a CPU pass of a DeepSeek block "
                   "computes the block's shared experts on the GPU while the CPU works (on, the default), or the "
                   "block computes them after it (off); two values need --interleave")
    p.add_argument("--compile", default="off", help="comma list of on|off: one-sequence decode steps captured with "
                   "the attention, norm and router modules compiled by torch.compile (`decode_compile`, "
                   "GraphedDecoder(compile_steps=True)) or as they are (off, the default); two values need --interleave")
    p.add_argument("--interleave", type=int, default=0, help="build every dtype's model, then time this many rounds, "
                   "each decoding with every dtype x host-node x spare-core x shared-overlap x compile variant of the "
                   "one placement in turn "
                   "(no --caps or --fill rows)")
    p.add_argument("--timeline", action="store_true",
                   help="with --interleave and flag hand-offs: where a token's time goes, from the hand-off thread's "
                        "clock (CPU passes, GPU work between them, the GPU and host work between tokens)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="greedy tokens to generate")
    p.add_argument("--long-prompt", type=int, default=2048, help="prefill timed with auto (0 = skip)")
    p.add_argument("--cpu-experts", default="",
                   help="comma list of k: the long prefill timed again with the CPU taking k experts a layer")
    p.add_argument("--split-steps", type=int, default=8, help="decode steps timed piece by piece for the split")
    p.add_argument("--cpu-threads", type=int, default=16)
    p.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--expert-dtype", default="bf16", help="comma list of bf16|int8|fp8|int4: rows per expert dtype")
    p.add_argument("--profile", type=int, default=0,
                   help="also print torch.profiler's table over this many eager decode steps per placement")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    args = p.parse_args(argv)
    for option, values in (("host_nodes", ("on", "off", "flag", "host-node")), ("spare_core", ("on", "off")),
                           ("shared_overlap", ("on", "off")), ("compile", ("on", "off"))):
        value = getattr(args, option)
        if not comma_list(value) or set(comma_list(value)) - set(values):
            p.error(f"--{option.replace('_', '-')} takes a comma list of {'|'.join(values)}, got {value!r}")
    if args.interleave < 0 or (args.interleave and len(comma_list(args.placements)) != 1):
        p.error("--interleave takes a count of rounds and exactly one --placements entry")
    for option in ("shared_overlap", "compile"):
        if len(comma_list(getattr(args, option))) > 1 and not args.interleave:
            p.error(f"--{option.replace('_', '-')} on,off compares decoders of one model: give --interleave")
    return args


def switches(text: str) -> list[bool]:
    """An on|off comma list (`--spare-core`) as booleans."""
    return [value == "on" for value in comma_list(text)]


def handoffs(text: str) -> list[str | bool]:
    """`--host-nodes` as the decoder's `handoff` per value (`on`: auto), False for `off` (eager passes)."""
    return [False if value == "off" else "auto" if value == "on" else value for value in comma_list(text)]


# ----------------------------------------------------------------------------- placing the experts
def place(model: nn.Module, modules: dict[str, HostExperts], mode: str, args: argparse.Namespace,
          crossovers: dict[str, Any]) -> ExpertEngine:
    """Every layer on `mode` (`auto` with the crossovers measured once per run, and the split model of long no-grad
    passes), resident copies made for `gpu`."""
    for module in modules.values():
        module.drop_resident()
        placement = ExpertPlacement.from_mode(mode, cpu_threads=args.cpu_threads, source="benchmark")
        if mode == "auto" and crossovers:
            placement = placement.with_crossovers(crossovers["inference"], crossovers["training"])
        module.placement = placement
        module.cpu_share = crossovers.get("split")
        module.forced_split = None
    release()
    engine = wire_engine(model, modules, measure=False)
    if mode == "gpu":
        for module in modules.values():
            module.resident_weights()
    return engine


def measure_auto(modules: dict[str, HostExperts], model: nn.Module, args: argparse.Namespace,
                 device: torch.device) -> dict[str, Any]:
    """Both crossovers of this layer shape on this machine (once per run), with the timings they came from."""
    first = next(iter(modules.values()))
    top_k = model.config.num_experts_per_tok
    start = time.perf_counter()
    found = measure_crossovers(first.hidden_dim, first.intermediate_dim, first.num_experts, top_k,
                               first.dtype, device, cpu_threads=args.cpu_threads,
                               scheme=scheme_of(first.host_weights()[0]), weights=first.host_weights())
    shown = {k: "never" if v == NEVER else str(v) for k, v in (("inference", found.inference),
                                                                ("training", found.training))}
    log(f"crossovers: inference {shown['inference']} / training {shown['training']} tokens "
        f"(copy {found.copy_s * 1e3:.1f} ms, measured in {time.perf_counter() - start:.2f} s)")
    log(measurement_note([found]) or "crossovers not measured")
    split = SplitModel.from_crossovers(found, first.num_experts, top_k, first.hidden_dim * first.dtype.itemsize)
    line = split.describe(args.long_prompt or 2048) if split is not None else None
    if line:
        log(line)
    return {"split_line": line, "inference": found.inference, "training": found.training, "copy_ms": found.copy_s * 1e3,
            "samples": found.samples, "copy_gb_per_s": found.copy_bandwidth / 1e9,
            "cpu_expert_samples": found.expert_samples, "phases": found.phases, "split": split}


# ----------------------------------------------------------------------------- decoding
def graphed_decode(decoder: GraphedDecoder, prompt: list[int], new_tokens: int, device: torch.device,
                   ) -> tuple[float, list[float], list[int]]:
    """Prefill `prompt`, then `new_tokens - 1` graphed steps picking the argmax (read on the host every token, as a
    streaming chat does). Returns (prefill seconds, per-token seconds, generated ids)."""
    synchronize(device)
    start = time.perf_counter()
    token = int(decoder.prefill(prompt).argmax())
    prefill = time.perf_counter() - start
    generated, steps = [token], []
    for i in range(new_tokens - 1):
        start = time.perf_counter()
        token = int(decoder.step([token], [len(prompt) + i])[0].argmax())
        steps.append(time.perf_counter() - start)
        generated.append(token)
    return prefill, steps, generated


@torch.inference_mode()
def eager_decode(model: nn.Module, prompt: list[int], new_tokens: int, device: torch.device,
                 ) -> tuple[float, list[float], list[int]]:
    """The same with transformers' own loop (dynamic cache, one forward per token, no graphs)."""
    key = cache_argument(transformers_model(model))
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    generated, steps = [int(token)], []
    prefill = time.perf_counter() - start
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{key: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(int(token))
        steps.append(time.perf_counter() - start)
    return prefill, steps, generated


def hand_off_label(nodes: str | bool) -> str:
    """A variant's hand-off in a round's log line ('' for the decoder's default)."""
    return " eager passes" if not nodes else "" if nodes == "auto" else f" {nodes}"


@contextlib.contextmanager
def shared_overlap(modules: dict[str, HostExperts], on: bool) -> Iterator[None]:
    """Inside the block, CPU passes compute their block's shared experts (`SharedOverlap`) when `on`, else the
    blocks do; a decoder captured inside keeps that choice in its graphs."""
    held = {name: m.shared_overlap for name, m in modules.items()}
    if not on:
        for m in modules.values():
            m.shared_overlap = None
    try:
        yield
    finally:
        for name, m in modules.items():
            m.shared_overlap = held[name]


def decoder_options(nodes: str | bool, spare: bool, compiled: bool = False) -> dict[str, Any]:
    """`GraphedDecoder` keywords of a host variant (`host_variants`): its hand-off, or eager passes for False; and
    whether one-sequence steps are compiled."""
    return {"host_nodes": bool(nodes), "handoff": nodes or "auto", "spare_core": spare, "compile_steps": compiled}


def graphed_split(model: nn.Module, prompt: list[int], steps: int, host_nodes: str | bool = "auto",
                  spare_core: bool = True, compiled: bool = False) -> dict[str, float] | None:
    """Median ms of expert passes, other GPU work and host overhead over `steps` timed replays of a decoder whose
    resident expert passes and host nodes have graphs of their own (None when graphs are not used)."""
    decoder = GraphedDecoder(model, 1, len(prompt) + steps + 2, split_experts=True,
                             **decoder_options(host_nodes, spare_core, compiled))
    token = int(decoder.prefill(prompt).argmax())
    decoder.step([token], [len(prompt)])  # capture
    times = []
    kernel_s = sum(job.seconds for job in decoder.host_jobs())
    for i in range(steps):
        logits, t = decoder.timed_step([token], [len(prompt) + 1 + i])
        if t is None:
            return None
        token = int(logits[0].argmax())
        times.append(t)
    kernel_s = sum(job.seconds for job in decoder.host_jobs()) - kernel_s
    return {"expert_ms": statistics.median(t.expert_ms for t in times),
            "other_gpu_ms": statistics.median(t.other_gpu_ms for t in times),
            "split_wall_ms": statistics.median(t.wall_ms for t in times),
            "host_node_kernel_ms": kernel_s * 1e3 / steps if decoder.host_jobs() else None}


def eager_split(model: nn.Module, prompt: list[int], steps: int, device: torch.device) -> dict[str, float]:
    """Per-token ms of expert kernels and of the other kernels over `steps` decode steps of transformers' own loop
    (after an unprofiled prefill), from torch.profiler (CUDA)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def timed(module: HostExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with record_function("kllama.experts"):
            return module.run_pass(x, index, weights)

    key = cache_argument(transformers_model(model))
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=True) as prof, expert_pass_hook(timed):
            for _ in range(steps):
                cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
                out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{key: cache})
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            synchronize(device)
    averages = prof.key_averages()

    def total(event: Any, name: str) -> float:
        value = getattr(event, name, None)  # torch >= 2.4 says device; older versions cuda
        return float(value if value is not None else getattr(event, name.replace("device", "cuda"), 0))

    kernels_us = sum(total(e, "self_device_time_total") for e in averages)
    expert_us = sum(total(e, "device_time_total") for e in averages if e.key == "kllama.experts")
    return {"expert_ms": expert_us / 1e3 / steps, "other_gpu_ms": (kernels_us - expert_us) / 1e3 / steps,
            "expert_passes_per_step": sum(e.count for e in averages if e.key == "kllama.experts") / steps}


def kernel_loop(decoder: GraphedDecoder, rounds: int) -> dict[str, float]:
    """The host nodes' kernel ms a layer inside the decode replays so far (the jobs' clocks), and over `rounds` runs
    of the same jobs back to back on this thread (same weights, the last step's routing): whether a layer's kernel
    costs more in decode than alone over the same weights."""
    jobs = decoder.host_jobs()
    seconds, runs = sum(job.seconds for job in jobs), sum(job.runs for job in jobs)
    for _ in range(rounds):
        for job in jobs:
            job.run()
    loop_s = sum(job.seconds for job in jobs) - seconds
    loop_runs = sum(job.runs for job in jobs) - runs
    return {"kernel_in_decode_ms_per_layer": seconds / max(runs, 1) * 1e3,
            "kernel_loop_ms_per_layer": loop_s / max(loop_runs, 1) * 1e3, "kernel_loop_rounds": rounds}


def timeline_split(stamps: list[tuple[int, int]], steps: int) -> dict[str, float] | None:
    """A token's time from the hand-off thread's stamps (go seen, done written; ns) of `steps` decode steps' CPU
    passes, in order: ms a token in the CPU passes, in the GPU work between two passes of a token (copies, flags,
    attention, router: everything from one pass's done to the next pass's go), and between the last pass of a token
    and the first of the next (the rest of the step's GPU work, the host's sampling and the next replay's launch).
    None when the stamps do not split into `steps` equal tokens."""
    if steps < 2 or not stamps or len(stamps) % steps:
        return None
    layers = len(stamps) // steps
    tokens = [stamps[t * layers:(t + 1) * layers] for t in range(steps)]
    cpu = [sum(done - go for go, done in token) / 1e6 for token in tokens]
    between = [sum(token[i + 1][0] - token[i][1] for i in range(layers - 1)) / 1e6 for token in tokens]
    edges = [(nxt[0][0] - token[-1][1]) / 1e6 for token, nxt in zip(tokens, tokens[1:])]
    return {"layers": layers, "cpu_ms_per_token": statistics.median(cpu),
            "between_passes_ms_per_token": statistics.median(between),
            "between_passes_us_per_gap": statistics.median(between) * 1e3 / max(layers - 1, 1),
            "between_tokens_ms": statistics.median(edges)}


def finish_row(row: dict[str, Any], split: dict[str, float] | None) -> dict[str, Any]:
    if split is not None:
        row.update(split)
        row["host_ms"] = max(0.0, row["ms_per_token"] - split["expert_ms"] - split["other_gpu_ms"])
    return row


def run_row(name: str, model: nn.Module, engine: ExpertEngine, args: argparse.Namespace, device: torch.device,
            prompt: list[int], *, graphs: bool, host_nodes: str | bool = "auto", spare_core: bool = True,
            ) -> dict[str, Any]:
    """Warm up, then time prefill + decode of one row; then the time split."""
    log(f"{name}: warm-up")
    if graphs:
        decoder = GraphedDecoder(model, 1, len(prompt) + args.new + 2,
                                 **decoder_options(host_nodes, spare_core, switches(args.compile)[0]))
        graphed_decode(decoder, prompt[:16], 4, device)  # captures the step
        run = lambda: graphed_decode(decoder, prompt, args.new, device)  # noqa: E731
    else:
        decoder = None
        eager_decode(model, prompt[:16], 4, device)
        run = lambda: eager_decode(model, prompt, args.new, device)  # noqa: E731
    reset_gpu_peak(device)
    prefill, steps, generated = run()
    mean = sum(steps) / len(steps)
    resident = sum(m.placement.target_for(1) == "gpu" for m in engine.modules.values())
    note = "" if decoder is None or decoder.graphed else f"eager: {decoder.reason}"
    log(f"{name}: prefill {prefill:.3f}s, decode {1 / mean:.2f} tok/s{'; ' + note if note else ''}")
    row = {"name": name, "decode_tokens_per_s": 1 / mean, "ms_per_token": mean * 1e3, "prefill_s": prefill,
           "decode_step_s": steps, "peak_gpu_gb": gpu_peak_gb(device), "peak_host_gb": peak_host_gb(),
           "host_now_gb": current_host_gb(), "generated_head": generated[:8], "resident_layers": resident,
           "graphed": bool(decoder is not None and decoder.graphed), "note": note,
           "compiled": bool(decoder is not None and decoder.compiled is not None),
           "handoff": decoder.handoff if decoder is not None and decoder.host_jobs() else None}
    if decoder is not None and args.kernel_loop and decoder.host_jobs():
        row.update(kernel_loop(decoder, args.kernel_loop))
        log(f"{name}: kernel {row['kernel_in_decode_ms_per_layer']:.3f} ms a layer in decode, "
            f"{row['kernel_loop_ms_per_layer']:.3f} back to back")
    del decoder
    release()
    if device.type != "cuda":
        split = None  # no GPU work to tell apart
    elif graphs:
        split = graphed_split(model, prompt, args.split_steps, host_nodes, spare_core, switches(args.compile)[0])
    else:
        split = eager_split(model, prompt, args.split_steps, device)
    if args.profile and not graphs:
        row["profile"] = profile_decode(model, prompt[:16], args.profile, device)
        print(row["profile"])
    return finish_row(row, split)


def time_prefill(decoder: GraphedDecoder, prompt: list[int], device: torch.device,
                 ) -> tuple[list[float], dict[str, Any]]:
    """Seconds of two prefills of `prompt` after a warm-up (stream slots, kernels for this length), and the split
    trace's summary of those two (`split_trace.summarize`: the CPU side's ms an expert, the gap between layers)."""
    decoder.prefill(prompt)
    times = []
    with traced_split() as timings:
        for _ in range(2):
            synchronize(device)
            start = time.perf_counter()
            decoder.prefill(prompt)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return times, summarize(timings)


def trace_line(trace: dict[str, Any]) -> str:
    """The split trace in one log line (empty when no layer split)."""
    if not trace["layers"]:
        return ""
    return (f" [CPU side {trace['cpu_ms_per_expert'] or 0:.2f} ms an expert (first layer "
            f"{trace['first_layer_cpu_ms_per_expert']:.2f}), gap {trace['gap_ms'] or 0:.2f} ms, worker start "
            f"{trace['worker_start_ms']:.2f} ms, cycle {trace['cycle_ms'] or 0:.2f} ms]")


def long_prefill(model: nn.Module, modules: dict[str, HostExperts], args: argparse.Namespace,
                 device: torch.device) -> dict[str, Any]:
    """Seconds to prefill a `--long-prompt`-token prompt (min of two after a warm-up), as `auto` places it (the
    CPU taking the cost model's k experts a layer), then with each `--cpu-experts` k forced."""
    length = args.long_prompt
    prompt = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    first = next(iter(modules.values()))
    k = first.split_for(length)
    plan = first.cpu_share.plan(length) if first.cpu_share is not None else None
    decoder = GraphedDecoder(model, 1, length + 2)
    times, trace = time_prefill(decoder, prompt, device)
    log(f"prefill of {length} tokens (CPU takes {k} experts a layer): {', '.join(f'{t:.3f}' for t in times)} s"
        f"{trace_line(trace)}")
    row = {"prefill_long_s": min(times), "prefill_long_runs_s": times, "long_prompt_tokens": length,
           "prefill_long_cpu_experts": k, "prefill_long_est_layer_ms": plan.layer_s * 1e3 if plan else None,
           "prefill_long_est_stream_layer_ms": plan.stream_s * 1e3 if plan else None, "prefill_long_trace": trace}
    forced: dict[int, float] = {}
    traces: dict[int, dict[str, Any]] = {}
    try:
        for value in (int(v) for v in comma_list(args.cpu_experts)):
            for module in modules.values():
                module.forced_split = value
            forced_times, traces[value] = time_prefill(decoder, prompt, device)
            forced[value] = min(forced_times)
            log(f"prefill of {length} tokens, CPU forced to {value} experts a layer: {forced[value]:.3f} s"
                f"{trace_line(traces[value])}")
    finally:
        for module in modules.values():
            module.forced_split = None
    del decoder
    release()
    return {**row, "prefill_long_forced_s": forced, "prefill_long_forced_trace": traces} if forced else row


def profile_decode(model: nn.Module, prompt: list[int], steps: int, device: torch.device) -> str:
    """torch.profiler's table over `steps` eager decode steps, where a token's time goes: top ops by self device time
    on a GPU (kernel counts and times: what a graphed step replays), else by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, acc_events=True) as prof:
        eager_decode(model, prompt, steps + 1, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60)


def cap_row(model: nn.Module, modules: dict[str, HostExperts], cap: str, args: argparse.Namespace,
            device: torch.device, prompt: list[int], crossovers: dict[str, int], suffix: str = "") -> dict[str, Any]:
    """`auto` under a GPU memory cap: layers resident while the cap (minus an inference reserve) allows."""
    engine = place(model, modules, "auto", args, crossovers)
    budget = parse_bytes(cap)
    set_gpu_cap(budget / 1e9, device)
    try:
        promoted = promote_resident_layers(engine, budget, device, inference_reserve_bytes(engine))
        log(f"under {cap}: {promoted} of {len(modules)} layers resident")
        row = run_row(f"kllama gpu under {cap} (graphs){suffix}", model, engine, args, device, prompt, graphs=True)
        row["cap"] = cap
        return row
    finally:
        set_gpu_cap(None, device)


def fill_row(model: nn.Module, modules: dict[str, HostExperts], fraction: float, args: argparse.Namespace,
             device: torch.device, prompt: list[int], crossovers: dict[str, Any], suffix: str = "") -> dict[str, Any]:
    """`auto` with the GPU filled as inference fills it without a cap (`gpu_memory_utilization`)."""
    engine = place(model, modules, "auto", args, crossovers)
    filled = fill_gpu_memory(engine, device, fraction)
    log(f"gpu_memory_utilization {fraction:g}: {len(filled)} of {len(modules)} layers resident")
    row = run_row(f"kllama auto, GPU filled ({fraction:g}, graphs){suffix}", model, engine, args, device, prompt,
                  graphs=True)
    row.update(fill=fraction, resident_layers=len(filled))
    if args.long_prompt:
        row.update(long_prefill(model, modules, args, device))
    return row


def guarded_row(rows: list[dict[str, Any]], name: str, modules: dict[str, HostExperts],
                run: Callable[[], dict[str, Any]]) -> None:
    """Append `run()`'s row to `rows`, or a row `name` saying it ran out of GPU memory; every layer is made
    non-resident and GPU memory released after it either way."""
    try:
        rows.append(run())
    except torch.cuda.OutOfMemoryError as exc:
        rows.append({"name": name, "note": "OOM", "error": str(exc).splitlines()[0]})
    finally:
        for module in modules.values():
            module.drop_resident()
        release()


def host_variants(mode: str, graphs: bool, args: argparse.Namespace) -> list[tuple[bool, bool]]:
    """The (host nodes, spare core) settings a `mode` row is run with: every `--host-nodes` x `--spare-core` value
    for graphed cpu/auto rows (the spare core matters only with host nodes), else the defaults."""
    if not graphs or mode not in ("cpu", "auto"):
        return [("auto", True)]
    return [(nodes, spare) for nodes in handoffs(args.host_nodes)
            for spare in (switches(args.spare_core) if nodes else [True])]


def variant_kind(mode: str, graphs: bool, nodes: bool, spare: bool, args: argparse.Namespace) -> str:
    """The parenthesised part of a row name: threads, graphs or eager, and the host-node settings where a run
    compares them."""
    threads = f"{args.cpu_threads} threads, " if mode in ("cpu", "auto") else ""
    kind = "graphs" if graphs else "eager"
    if graphs and mode in ("cpu", "auto"):
        if len(handoffs(args.host_nodes)) > 1:
            kind += (", host nodes" if nodes == "auto" else f", {nodes} hand-off") if nodes else ", eager host passes"
        if len(switches(args.spare_core)) > 1 and nodes:
            kind += ", spare core" if spare else ", all cores"
    return f"{threads}{kind}"


def build_dtype(config: Any, device: torch.device, args: argparse.Namespace, placements: list[str], caps: list[str],
                expert_dtype: str) -> tuple[nn.Module, dict[str, HostExperts], dict[str, Any], dict[str, Any]]:
    """The model with experts held as `expert_dtype` (the same random weights for every dtype), what its build
    measured (time, host memory, crossovers) and the crossovers `place` takes (measured when a row needs them)."""
    rss_before = current_host_gb()
    torch.manual_seed(0)  # every dtype draws the same weights: a quantized build holds the bf16 build quantized
    start = time.perf_counter()
    model, modules = build_model(config, device, host_experts=True, expert_dtype=expert_dtype)
    build_s = time.perf_counter() - start
    if switches(args.shared_overlap) == [False]:
        for m in modules.values():
            m.shared_overlap = None
    host_gb = sum(m.host_bytes() for m in modules.values()) / 1e9
    by_node = process_gb_by_node()  # where the weights landed: threads reading another node's memory read slower
    log(f"built ({expert_dtype}) in {build_s:.1f}s: {host_gb:.1f} GB of experts, host RSS {current_host_gb():.1f} GB"
        + node_split_text(by_node))
    build = {"build_s": build_s, "expert_host_gb": host_gb, "host_rss_before_build_gb": rss_before,
             "host_rss_after_build_gb": current_host_gb(), "process_gb_by_node": by_node}
    auto = measure_auto(modules, model, args, device) if "auto" in placements or caps or args.fill else {}
    split = auto.pop("split", None)  # the model object; the JSON keeps its samples and the start-up line
    build["crossovers"] = auto
    crossovers = {"inference": auto["inference"], "training": auto["training"], "split": split} if auto else {}
    return model, modules, build, crossovers


def interleaved_rows(config: Any, device: torch.device, args: argparse.Namespace, mode: str, prompt: list[int],
                     dtypes: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`--interleave`: every dtype's model built and placed on `mode`, a decoder captured per dtype x host-node
    x spare-core variant, then rounds of `--new` tokens with each variant in turn (the module docstring); appends
    one row per variant to `rows` and returns the builds."""
    builds, decoders, names, base_of, capture_s = {}, {}, {}, {}, {}
    graphs = True  # decoders (graphed where CUDA is): transformers' eager loop is not a variant here
    models = []
    for dtype in dtypes:
        model, modules, builds[dtype], crossovers = build_dtype(config, device, args, [mode], [], dtype)
        models.append((model, modules))
        place(model, modules, mode, args, crossovers)
        for (nodes, spare), shared, compiled in itertools.product(
                host_variants(mode, graphs, args), switches(args.shared_overlap), switches(args.compile)):
            key = (dtype, nodes, spare, shared, compiled)
            kind = variant_kind(mode, graphs, nodes, spare, args)
            if len(switches(args.shared_overlap)) > 1:
                kind += ", shared experts " + ("beside the CPU" if shared else "after it")
            if len(switches(args.compile)) > 1:
                kind += ", compiled" if compiled else ", not compiled"
            names[key] = f"kllama {mode} ({kind}), {dtype}, interleaved"
            with shared_overlap(modules, shared):
                began = time.perf_counter()
                decoders[key] = GraphedDecoder(model, 1, len(prompt) + args.new + 2,
                                               **decoder_options(nodes, spare, compiled))
                graphed_decode(decoders[key], prompt[:16], 4, device)  # captures the step
                capture_s[key] = time.perf_counter() - began
    keys = list(decoders)
    base_dtype = "bf16" if "bf16" in dtypes else dtypes[0]
    first_base = next(k for k in keys if k[0] == base_dtype)
    for key in keys:
        same = (base_dtype, *key[1:])
        base_of[key] = first_base if key[0] == base_dtype or same not in decoders else same
    speeds: dict[tuple, list[float]] = {key: [] for key in keys}
    kernel = {key: [0.0, 0, 0] for key in keys}  # host nodes' kernel: seconds, runs, decode steps (prefills aside)
    runner = handoff_runner() if args.timeline and any(decoders[key].handoff == "flag" for key in keys) else None
    timelines: dict[tuple, list[dict[str, float]]] = {key: [] for key in keys}
    generated: dict[tuple, list[int]] = {}
    for round_ in range(args.interleave):
        for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
            jobs = decoders[key].host_jobs()
            before = sum(job.seconds for job in jobs), sum(job.runs for job in jobs)
            if runner is not None:
                runner.timeline()  # drops what earlier rounds left
            _, steps, generated[key] = graphed_decode(decoders[key], prompt, args.new, device)
            found = timeline_split(runner.timeline(), len(steps)) if runner is not None else None
            if found is not None:
                timelines[key].append(found)
            speeds[key].append(len(steps) / sum(steps))
            kernel[key][0] += sum(job.seconds for job in jobs) - before[0]
            kernel[key][1] += sum(job.runs for job in jobs) - before[1]
            kernel[key][2] += len(steps)
        log(f"round {round_ + 1}/{args.interleave}: " + ", ".join(
            f"{key[0]}{hand_off_label(key[1])}{'' if key[2] else ' all cores'}{'' if key[3] else ' shared after'}"
            f"{' compiled' if key[4] else ''} "
            f"{speeds[key][-1]:.2f}"
            for key in keys) + " tok/s")
    for key in keys:
        ratios = [a / b for a, b in zip(speeds[key], speeds[base_of[key]])]
        median = statistics.median(speeds[key])
        row = {"name": names[key], "decode_tokens_per_s": median, "ms_per_token": 1e3 / median,
               "rounds_tokens_per_s": speeds[key], "expert_dtype": key[0], "host_nodes": key[1], "spare_core": key[2],
               "shared_overlap": key[3], "compiled": decoders[key].compiled is not None,
               "compile_reason": decoders[key].compile_reason, "capture_s": capture_s[key],
               "base": names[base_of[key]], "x_base": statistics.median(ratios), "x_base_rounds": ratios,
               "x_base_text": f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
               "generated_head": generated[key][:8], "graphed": decoders[key].graphed,
               "handoff": decoders[key].handoff if decoders[key].host_jobs() else None,
               "resident_layers": sum(m.placement.target_for(1) == "gpu"
                                      for m in models[dtypes.index(key[0])][1].values()),
               "peak_host_gb": peak_host_gb(), "note": "" if decoders[key].graphed else f"eager: {decoders[key].reason}"}
        seconds, runs, steps = kernel[key]
        if runs:  # host nodes ran: the kernel's own time a decoded token and a layer, over every round
            row.update(host_node_kernel_ms=seconds * 1e3 / steps, kernel_in_decode_ms_per_layer=seconds * 1e3 / runs)
        if timelines[key]:  # the median round of each part
            row["timeline"] = {part: statistics.median(t[part] for t in timelines[key]) for part in timelines[key][0]}
            t = row["timeline"]
            log(f"{names[key]}: a token {row['ms_per_token']:.2f} ms = CPU passes {t['cpu_ms_per_token']:.2f} + "
                f"between passes {t['between_passes_ms_per_token']:.2f} ({t['between_passes_us_per_gap']:.1f} us "
                f"x {t['layers'] - 1}) + between tokens {t['between_tokens_ms']:.2f} (medians over rounds)")
        rows.append(row)
    del decoders, models
    release()
    return builds


def dtype_rows(config: Any, device: torch.device, args: argparse.Namespace, placements: list[str], caps: list[str],
               prompt: list[int], expert_dtype: str, suffix: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Build the model with experts held as `expert_dtype`, append its rows (names end with `suffix`) to `rows`,
    free it; returns what the build measured (time, host memory, crossovers)."""
    model, modules, build, crossovers = build_dtype(config, device, args, placements, caps, expert_dtype)
    plan = [(mode, graphs, nodes, spare) for mode in placements
            for graphs in ((False, True) if mode == "gpu" and not args.no_eager else (True,))
            for nodes, spare in host_variants(mode, graphs, args)]
    for mode, graphs, nodes, spare in plan:
        name = f"kllama {mode} ({variant_kind(mode, graphs, nodes, spare, args)}){suffix}"

        def placement_row(mode: str = mode, graphs: bool = graphs, nodes: str | bool = nodes, spare: bool = spare,
                          name: str = name) -> dict[str, Any]:
            engine = place(model, modules, mode, args, crossovers)
            row = run_row(name, model, engine, args, device, prompt, graphs=graphs, host_nodes=nodes,
                          spare_core=spare)
            row.update(expert_dtype=expert_dtype, host_nodes=nodes, spare_core=spare)
            if mode == "auto":
                row["crossovers"] = {k: crossovers[k] for k in ("inference", "training")} if crossovers else {}
                if args.long_prompt:
                    row.update(long_prefill(model, modules, args, device))
            return row

        guarded_row(rows, name, modules, placement_row)
    for fraction in (float(f) for f in comma_list(args.fill)):
        guarded_row(rows, f"kllama auto, GPU filled ({fraction:g}){suffix}", modules, lambda fraction=fraction: {
            **fill_row(model, modules, fraction, args, device, prompt, crossovers, suffix), "expert_dtype": expert_dtype})
    for cap in caps:
        guarded_row(rows, f"kllama gpu under {cap}{suffix}", modules, lambda cap=cap: {
            **cap_row(model, modules, cap, args, device, prompt, crossovers, suffix), "expert_dtype": expert_dtype})
    del model, modules
    release()
    return build


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    placements = placement_list(args.placements)
    caps = comma_list(args.caps)
    device = compute_device()
    if args.tiny:
        args.prompt, args.new, args.long_prompt = min(args.prompt, 16), min(args.new, 8), min(args.long_prompt, 32)
        args.split_steps = min(args.split_steps, 2)
        args.cpu_threads = min(args.cpu_threads, os.cpu_count() or 1)
        warnings.filterwarnings("ignore", message=".*needs a CUDA compute device.*")
    if device.type != "cuda":
        caps, args.fill = [], ""  # a GPU memory cap (or fraction) means nothing without a GPU
    dtypes = expert_dtype_list(args.expert_dtype)
    torch.manual_seed(0)
    config = model_config(args.model, tiny=args.tiny, layers=args.layers)
    log(f"decode {args.model}{' (tiny)' if args.tiny else ''}: {config.num_hidden_layers} layers, prompt "
        f"{args.prompt}, {args.new} new tokens, device {device}")
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows: list[dict[str, Any]] = []
    builds: dict[str, Any] = {}
    if args.interleave:
        builds = interleaved_rows(config, device, args, placements[0], prompt, dtypes, rows)
    for expert_dtype in dtypes if not args.interleave else []:
        suffix = f", {expert_dtype}" if len(dtypes) > 1 or expert_dtype != "bf16" else ""
        builds[expert_dtype] = dtype_rows(config, device, args, placements, caps, prompt, expert_dtype, suffix, rows)
    first = builds[dtypes[0]]
    build_s, auto = first["build_s"], first["crossovers"]
    results = {
        "benchmark": "decode", "model": args.model, "tiny": args.tiny, "layers": config.num_hidden_layers,
        "layers_limited": args.layers is not None, "config": shape_summary(config), "prompt_tokens": args.prompt,
        "new_tokens": args.new, "batch": 1, "cpu_threads": args.cpu_threads, "build_s": build_s,
        "crossovers": auto, "environment": environment(), "rows": rows, "expert_dtypes": dtypes, "builds": builds,
        "interleave_rounds": args.interleave,
    }
    print(format_table(rows, DECODE_COLUMNS), flush=True)
    path = write_results(results, f"decode_{args.model}{'_tiny' if args.tiny else ''}", args.out_dir)
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
