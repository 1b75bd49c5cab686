"""Data-parallel DPO throughput: N processes (one per GPU) over one shared host copy of the routed experts.

    PYTHONPATH=src python benchmarks/dpo_ddp.py --model v2lite --nproc 1,2 --gpu-cap-gb 24 --baseline

Each count in `--nproc` is one torchrun job (`--nproc 1`: a plain process) on the same full-size random model. Every
rank runs kllama's DPO micro-step (reference pass, policy pass through the DDP wrapper, backward with the LoRA
gradients all-reduced, AdamW step) on its own `2 * pairs * seq` tokens; rows: `stream` under `--gpu-cap-gb` per GPU,
`gpu` (experts resident on every GPU) and, with `--baseline`, stock transformers + peft under DDP (every weight on
every GPU). tok/s is summed over the ranks. Host memory: each rank's RSS and PSS and the node's sum of PSS (shared
expert pages counted once) against the checkpoint's bf16 size. A copy probe times host->GPU copies of one layer's
experts from the shared memory, each GPU alone and all at once. Prints a table, writes one JSON per count and, for
several counts, the scaling of each row. `--tiny` runs on the CPU (gloo) as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR, build_model, compute_device, format_table, gpu_peak_gb, log, model_config, release, reset_gpu_peak, set_gpu_cap,
    shape_summary, synchronize, write_results,
)
from dpo_throughput import LEARNING_RATE, SETTINGS, place_experts, prepare_training, synthetic_batch  # noqa: E402
from kllama.model.adapters import adapters_disabled, lora_parameters  # noqa: E402
from kllama.train.distributed import (  # noqa: E402
    expert_memory_per_node, gather_objects, init_distributed, shutdown_distributed,
)
from kllama.train.launch import free_port  # noqa: E402
from kllama.train.losses import preference_loss  # noqa: E402
from kllama.train.trainer import policy_logps  # noqa: E402

COLUMNS = (
    ("name", "run", "{}"), ("ranks", "ranks", "{}"), ("tokens_per_s", "tok/s (all ranks)", "{:,.0f}"),
    ("s_per_step", "s/step", "{:.2f}"), ("peak_gpu_gb", "peak GPU GB/rank", "{:.1f}"),
    ("node_pss_gb", "node host PSS GB", "{:.1f}"), ("pss_vs_checkpoint", "PSS/ckpt", "{:.2f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("v2lite", "qwen3-30b"), default="v2lite")
    p.add_argument("--nproc", default="2", help="comma list of process counts, one torchrun job each (e.g. 1,2)")
    p.add_argument("--placements", default="stream,gpu", help="comma list of stream|gpu")
    p.add_argument("--gpu-cap-gb", type=float, default=None, help="GPU memory cap per GPU for `stream` (e.g. 24)")
    p.add_argument("--baseline", action="store_true", help="also run stock transformers + peft under DDP")
    p.add_argument("--pairs", type=int, default=4, help="pairs per rank per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    p.add_argument("--probe-reps", type=int, default=5, help="copies per GPU in the concurrent copy probe")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU, gloo (smoke test)")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- memory
def memory_now() -> dict[str, float]:
    """This process's RSS and PSS now (GB), from /proc/self/smaps_rollup (PSS charges shared pages 1/N each)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return {"rss_gb": fields.get("Rss", 0) / 1e9, "pss_gb": fields.get("Pss", 0) / 1e9,
            "shmem_rss_gb": fields.get("Rss_Shmem", fields.get("Shared_Clean", 0)) / 1e9}


def node_memory(checkpoint_gb: float) -> dict[str, Any]:
    """Every rank's memory and the node total (one node: the sum of PSS counts shared pages once)."""
    ranks = gather_objects(memory_now())
    pss = sum(r["pss_gb"] for r in ranks)
    return {"per_rank": ranks, "node_pss_gb": pss, "node_rss_sum_gb": sum(r["rss_gb"] for r in ranks),
            "pss_vs_checkpoint": pss / checkpoint_gb}


# ----------------------------------------------------------------------------- the step
def ddp_wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DDP as the Trainer wraps it (every LoRA parameter gets a gradient: no unused-parameter search)."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False)


def ddp_step(wrapped: torch.nn.Module, peft_model: torch.nn.Module, batch: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer) -> float:
    """kllama's DPO micro-step under DDP: reference pass (adapters off, no grad), policy pass through the wrapper
    (chunked log-probs), sigmoid-DPO loss, backward (LoRA gradients all-reduced), AdamW step."""
    with torch.no_grad(), adapters_disabled(peft_model):
        ref = policy_logps(wrapped, batch, SETTINGS)[0]  # [2P]
    policy = policy_logps(wrapped, batch, SETTINGS)[0]  # [2P]
    half = policy.shape[0] // 2
    losses, _, _ = preference_loss("sigmoid", policy[:half], policy[half:], ref[:half], ref[half:], beta=SETTINGS.beta)
    loss = losses.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed_row(name: str, wrapped: torch.nn.Module, peft_model: torch.nn.Module, batch: dict[str, torch.Tensor],
              args: argparse.Namespace, device: torch.device, tokens_all: int) -> dict[str, Any]:
    """Warm-up then timed steps; the wall time of a step is the same on every rank (the all-reduce joins them)."""
    optimizer = torch.optim.AdamW(list(lora_parameters(peft_model).values()), lr=LEARNING_RATE)
    reset_gpu_peak(device)
    for _ in range(args.warmup):
        ddp_step(wrapped, peft_model, batch, optimizer)
    step_s = []
    for i in range(args.steps):
        synchronize(device)
        _barrier()
        start = time.perf_counter()
        loss = ddp_step(wrapped, peft_model, batch, optimizer)
        synchronize(device)
        _barrier()
        step_s.append(time.perf_counter() - start)
        log(f"{name}: step {i + 1}/{args.steps} {step_s[-1]:.2f}s ({tokens_all / step_s[-1]:,.0f} tok/s all ranks) "
            f"loss {loss:.4f}")
    mean = sum(step_s) / len(step_s)
    peaks = gather_objects(gpu_peak_gb(device))
    del optimizer
    return {"name": name, "tokens_per_s": tokens_all / mean, "s_per_step": mean, "step_s": step_s,
            "peak_gpu_gb": max((p for p in peaks if p is not None), default=None)}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- copy probe
def copy_probe(source: torch.Tensor, device: torch.device, reps: int) -> dict[str, Any]:
    """Host->GPU copies of `source` (one layer's experts in the shared host memory): each rank's GPU alone, then all
    ranks at once. GB/s per rank and in total."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    target = torch.empty(source.shape, dtype=source.dtype, device=device)
    gb = source.numel() * source.element_size() / 1e9

    def copies() -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            target.copy_(source, non_blocking=True)
        synchronize(device)
        return gb * reps / (time.perf_counter() - start)

    copies()  # warm-up
    alone = None
    for turn in range(world):  # one GPU at a time
        _barrier()
        if rank == turn:
            alone = copies()
    _barrier()
    together = copies()  # every GPU at once
    alone_all, together_all = gather_objects(alone), gather_objects(together)
    del target
    return {"gb_per_copy": gb, "alone_gb_s": alone_all, "together_gb_s": together_all,
            "together_total_gb_s": sum(together_all)}


# ----------------------------------------------------------------------------- one job (every rank runs this)
def run_job(args: argparse.Namespace) -> dict[str, Any] | None:
    rank = init_distributed(1800)
    device = compute_device()
    world = rank.world_size
    torch.manual_seed(0)
    config = model_config(args.model, tiny=args.tiny, layers=args.layers)
    tokens = 2 * args.pairs * args.seq
    results: dict[str, Any] = {"benchmark": "dpo_ddp", "model": args.model, "tiny": args.tiny, "ranks": world,
                               "config": shape_summary(config), "tokens_per_rank_step": tokens, "pairs": args.pairs,
                               "seq": args.seq, "gpu_cap_gb": args.gpu_cap_gb, "rows": []}
    log(f"rank {rank.rank}/{world}: building the engine model on {device}")
    start = time.perf_counter()
    with expert_memory_per_node(rank, use_kt=True):  # one host copy of the experts per node
        lm, modules = build_model(config, device, host_experts=True)
    expert_gb = sum(m.host_bytes() for m in modules.values()) / 1e9
    other_gb = sum(p.numel() * p.element_size() for p in lm.parameters()) / 1e9
    checkpoint_gb = expert_gb + other_gb
    results.update(build_s=time.perf_counter() - start, expert_host_gb=expert_gb, checkpoint_gb=checkpoint_gb)
    results["memory_after_build"] = node_memory(checkpoint_gb)
    log(f"built in {results['build_s']:.1f}s; experts {expert_gb:.2f} GB, checkpoint {checkpoint_gb:.2f} GB; node PSS "
        f"{results['memory_after_build']['node_pss_gb']:.2f} GB")
    first = next(iter(modules.values()))
    results["copy_probe"] = copy_probe(first.host_weights()[0], device, args.probe_reps)
    log(f"copy probe: {results['copy_probe']}")
    peft_model = prepare_training(lm)
    wrapped = ddp_wrap(peft_model, device)
    batch = synthetic_batch(config.vocab_size, args.pairs, args.seq, device, seed=rank.rank)
    for mode in args.placements:
        capped = mode == "stream" and args.gpu_cap_gb is not None
        name = f"kllama {mode}" + (f" (cap {args.gpu_cap_gb:g} GB/GPU)" if capped else "")
        set_gpu_cap(args.gpu_cap_gb if capped else None, device)
        place_experts(lm, modules, mode, argparse.Namespace(cpu_threads=None, gpu_cap_gb=args.gpu_cap_gb), device)
        row = timed_row(name, wrapped, peft_model, batch, args, device, tokens * world)
        row.update(node_memory(checkpoint_gb), ranks=world)
        results["rows"].append(row)
        set_gpu_cap(None, device)
    for module in modules.values():
        module.drop_resident()
    del wrapped, peft_model, lm, modules
    release()
    if args.baseline:
        log("building the stock model (every weight on every GPU)")
        stock, _ = build_model(config, device, host_experts=False)
        peft_model = prepare_training(stock)
        wrapped = ddp_wrap(peft_model, device)
        row = timed_row("stock+peft DDP (chunked logps)", wrapped, peft_model, batch, args, device, tokens * world)
        row.update(node_memory(checkpoint_gb), ranks=world)
        results["rows"].append(row)
        del wrapped, peft_model, stock
        release()
    shutdown_distributed()
    return results if rank.is_main else None


# ----------------------------------------------------------------------------- driver
def launch_counts(args: argparse.Namespace, argv: list[str]) -> dict[int, dict[str, Any]]:
    """One job per process count (torchrun for more than one), each writing its JSON; returns them by count."""
    out_dir = args.out_dir or RESULTS_DIR
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
            and not a.startswith("--nproc=")]
    found: dict[int, dict[str, Any]] = {}
    for count in [int(c) for c in args.nproc.split(",") if c.strip()]:
        job = [__file__, "--job", *rest]  # a job's rank count is torchrun's WORLD_SIZE
        if count > 1:
            job = ["-m", "torch.distributed.run", "--nproc_per_node", str(count), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), *job]
        log(f"{count} rank(s): {' '.join(job)}")
        started = time.time()
        subprocess.run([sys.executable, *job], check=True)
        written = [p for p in out_dir.glob(f"{_stem(args, count)}_*.json") if p.stat().st_mtime >= started]
        found[count] = json.loads(max(written, key=lambda p: p.stat().st_mtime).read_text()) if written else {}
    return found


def _stem(args: argparse.Namespace, count: int) -> str:
    return f"dpo_ddp_{args.model}_{count}rank{'_tiny' if args.tiny else ''}"


def scaling(found: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's tok/s at every count against its 1-rank tok/s (when 1 was run)."""
    base = {r["name"]: r["tokens_per_s"] for r in found.get(1, {}).get("rows", [])}
    out = []
    for count, result in sorted(found.items()):
        for row in result.get("rows", []):
            one = base.get(row["name"])
            out.append({"name": row["name"], "ranks": count, "tokens_per_s": row["tokens_per_s"],
                        "speedup_vs_1": row["tokens_per_s"] / one if one else None})
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = "--job" in argv
    args = parse_args([a for a in argv if a != "--job"])
    args.placements = [p for p in args.placements.split(",") if p]
    if args.tiny:
        args.pairs, args.seq, args.warmup, args.steps, args.probe_reps = 1, 32, 0, 1, 1
        warnings.filterwarnings("ignore", message=".*needs a CUDA compute device.*")  # stream/gpu run on the CPU
    if job:
        results = run_job(args)
        if results is not None:
            print(format_table(results["rows"], COLUMNS), flush=True)
            log(f"wrote {write_results(results, _stem(args, results['ranks']), args.out_dir)}")
        return
    found = launch_counts(args, argv)
    summary = scaling(found)
    for row in summary:
        speed = f"{row['speedup_vs_1']:.2f}x one rank" if row["speedup_vs_1"] else ""
        log(f"{row['name']}: {row['ranks']} rank(s) {row['tokens_per_s']:,.0f} tok/s {speed}")
    if len(found) > 1:
        write_results({"benchmark": "dpo_ddp_scaling", "model": args.model, "rows": summary},
                      f"dpo_ddp_{args.model}_scaling{'_tiny' if args.tiny else ''}", args.out_dir)


if __name__ == "__main__":
    main()
