"""Probe: how fast the CPU moves routed-expert weights at decode (one token, top-k experts of one V2-Lite layer).

At batch 1 a CPU expert pass is a handful of matrix-vector products over bf16 weights, so it is bound by memory
bandwidth; this prints the effective GB/s of the torch calls the engine could use, for a few thread counts, and the
engine's whole `cpu` layer pass at 1 token. Writes benchmarks/results/cpu_gemv.json. CPU only (runs anywhere).

Usage: python benchmarks/cpu_gemv.py [--threads 16,8] [--experts 64] [--hidden 2048] [--inter 1408] [--top-k 6]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kllama.experts.routed import routed_experts_math


def best_of(fn, repeats: int = 20) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="16,8")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=1408)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/cpu_gemv.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    E, H, I, K = args.experts, args.hidden, args.inter, args.top_k  # noqa: N806
    gate_up = torch.randn(E, 2 * I, H, dtype=torch.bfloat16) * 0.02  # [E, 2I, H]
    down = torch.randn(E, H, I, dtype=torch.bfloat16) * 0.02  # [E, H, I]
    experts = torch.randperm(E)[:K].tolist()
    x = torch.randn(1, H, dtype=torch.bfloat16)
    act = torch.randn(1, I, dtype=torch.bfloat16)
    bytes_moved = K * (gate_up[0].numel() + down[0].numel()) * 2
    gate_up32 = gate_up[experts].float()
    down32 = down[experts].float()
    x32, act32 = x.float(), act.float()

    variants = {
        "x @ W.T (bf16)": lambda: [(x @ gate_up[e].T, act @ down[e].T) for e in experts],
        "F.linear (bf16)": lambda: [(torch.nn.functional.linear(x, gate_up[e]),
                                     torch.nn.functional.linear(act, down[e])) for e in experts],
        "torch.mv (bf16)": lambda: [(torch.mv(gate_up[e], x[0]), torch.mv(down[e], act[0])) for e in experts],
        "F.linear (fp32 weights)": lambda: [(torch.nn.functional.linear(x32, gate_up32[i]),
                                             torch.nn.functional.linear(act32, down32[i])) for i in range(K)],
    }
    index = torch.tensor([experts])  # [1, K]
    weights = torch.full((1, K), 1.0 / K)
    variants["engine cpu layer pass, 1 token"] = lambda: routed_experts_math(
        x, index, weights, gate_up, down, torch.nn.functional.silu)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, fn in variants.items():
            seconds = best_of(fn)
            rows.append({"variant": name, "threads": threads, "ms": seconds * 1e3,
                         "GB_per_s": bytes_moved / seconds / 1e9})
    print(f"top-{K} of {E} experts, H={H} I={I}: {bytes_moved / 2**20:.0f} MiB of bf16 weights per token-layer")
    print(f"{'variant':34s} {'threads':>7s} {'ms':>8s} {'GB/s':>7s}")
    for row in rows:
        print(f"{row['variant']:34s} {row['threads']:7d} {row['ms']:8.3f} {row['GB_per_s']:7.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "cpu_count": torch.get_num_threads()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
