"""Greedy decode speed of a DeepSeek-V2-Lite-shaped random model: CPU experts vs resident experts (and others).

    PYTHONPATH=src python benchmarks/decode.py --model v2lite --placements cpu,gpu

Batch 1, a `--prompt`-token prompt (prefill timed separately), then `--new` greedy tokens with the KV cache, one
forward per token. `cpu` computes the routed experts next to their host weights (`cpu_infer` threads), `gpu` keeps
them resident, `stream`/`auto` are accepted too (`auto` decodes on the CPU below its measured crossover).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    build_model, compute_device, current_host_gb, environment, format_table, gpu_peak_gb, log, model_config,
    peak_host_gb, release, reset_gpu_peak, shape_summary, synchronize, write_results,
)
from kllama.experts.install import wire_engine  # noqa: E402
from kllama.experts.placement import ExpertPlacement  # noqa: E402

DECODE_COLUMNS = (
    ("name", "run", "{}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.2f}"),
    ("ms_per_token", "ms/token", "{:.1f}"),
    ("prefill_s", "prefill s", "{:.3f}"),
    ("peak_gpu_gb", "peak GPU GB", "{:.1f}"),
    ("peak_host_gb", "peak host GB", "{:.1f}"),
    ("note", "note", "{}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("v2lite", "qwen3-30b"), default="v2lite")
    p.add_argument("--placements", default="cpu,gpu", help="comma list of cpu|gpu|stream|auto")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="greedy tokens to generate")
    p.add_argument("--cpu-threads", type=int, default=16)
    p.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--profile", type=int, default=0,
                   help="also profile this many decode steps per placement (torch.profiler table, CPU time)")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    return p.parse_args(argv)


@torch.no_grad()
def greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device,
                  ) -> tuple[float, list[float], list[int]]:
    """Prefill `prompt [1, P]`, then `new_tokens - 1` one-token steps with the KV cache, picking the argmax.
    Returns (prefill seconds, per-token decode seconds, generated ids)."""
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    synchronize(device)
    prefill = time.perf_counter() - start
    past, generated, steps = out.past_key_values, [int(token)], []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(int(token))  # the host read synchronises, as a streaming chat loop does
        steps.append(time.perf_counter() - start)
    return prefill, steps, generated


def run_placement(model: nn.Module, modules: dict, mode: str, args: argparse.Namespace, device: torch.device,
                  prompt: torch.Tensor) -> dict[str, Any]:
    """Place every MoE layer on `mode`, warm up with a short decode, then time prefill + decode."""
    for module in modules.values():
        module.drop_resident()
        module.placement = ExpertPlacement.from_mode(mode, cpu_threads=args.cpu_threads, source="benchmark")
    release()
    wire_engine(model, modules, measure=mode == "auto")
    if mode == "gpu":
        for module in modules.values():
            module.resident_weights()
    crossover = next(iter(modules.values())).placement.crossover_tokens
    log(f"{mode}: warm-up")
    greedy_decode(model, prompt[:, :16], 4, device)
    reset_gpu_peak(device)
    prefill, steps, generated = greedy_decode(model, prompt, args.new, device)
    mean = sum(steps) / len(steps)
    name = f"kllama {mode}" + (f" ({args.cpu_threads} threads)" if mode in ("cpu", "auto") else "")
    log(f"{name}: prefill {prefill:.3f}s, decode {1 / mean:.2f} tok/s")
    row = {"name": name, "decode_tokens_per_s": 1 / mean, "ms_per_token": mean * 1e3, "prefill_s": prefill,
           "decode_step_s": steps, "peak_gpu_gb": gpu_peak_gb(device), "peak_host_gb": peak_host_gb(),
           "host_now_gb": current_host_gb(), "generated_head": generated[:8]}
    if crossover is not None:
        row["crossover_tokens"] = crossover
    if args.profile:
        row["profile"] = profile_decode(model, prompt[:, :16], args.profile, device)
        print(row["profile"])
    return row


def profile_decode(model: nn.Module, prompt: torch.Tensor, steps: int, device: torch.device) -> str:
    """torch.profiler's table (top ops by self CPU time) over `steps` decode steps: where a token's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        greedy_decode(model, prompt, steps + 1, device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    unknown = [p for p in placements if p not in ("stream", "auto", "gpu", "cpu")]
    if unknown:
        raise SystemExit(f"unknown placements {unknown}; choose from stream, auto, gpu, cpu")
    device = compute_device()
    if args.tiny:
        args.prompt, args.new = min(args.prompt, 16), min(args.new, 8)
        args.cpu_threads = min(args.cpu_threads, os.cpu_count() or 1)
        warnings.filterwarnings("ignore", message=".*needs a CUDA compute device.*")
    torch.manual_seed(0)
    config = model_config(args.model, tiny=args.tiny, layers=args.layers)
    log(f"decode {args.model}{' (tiny)' if args.tiny else ''}: {config.num_hidden_layers} layers, prompt "
        f"{args.prompt}, {args.new} new tokens, device {device}")
    start = time.perf_counter()
    model, modules = build_model(config, device, host_experts=True)
    build_s = time.perf_counter() - start
    log(f"built in {build_s:.1f}s, host RSS {current_host_gb():.1f} GB")
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    rows = []
    for mode in placements:
        try:
            rows.append(run_placement(model, modules, mode, args, device, prompt))
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({"name": f"kllama {mode}", "note": "OOM", "error": str(exc).splitlines()[0]})
        finally:
            for module in modules.values():
                module.drop_resident()
            release()
    results = {
        "benchmark": "decode", "model": args.model, "tiny": args.tiny, "layers": config.num_hidden_layers,
        "layers_limited": args.layers is not None, "config": shape_summary(config), "prompt_tokens": args.prompt,
        "new_tokens": args.new, "batch": 1, "cpu_threads": args.cpu_threads, "build_s": build_s,
        "environment": environment(), "rows": rows,
    }
    print(format_table(rows, DECODE_COLUMNS), flush=True)
    path = write_results(results, f"decode_{args.model}{'_tiny' if args.tiny else ''}", args.out_dir)
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
