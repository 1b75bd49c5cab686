"""Profile one resident V2-Lite-shaped MoE layer, forward + backward, on the GPU: which kernels take the time.

Prints torch.profiler's table (CUDA time, top rows) for the `gpu` target with and without expert LoRA, and writes
it to benchmarks/results/profile_layer.txt. A diagnostic for the engine's own overhead (LoRA, sorting, casts), not a
throughput claim.

Usage: python benchmarks/profile_layer.py [--tokens 4096] [--lora 8] [--rows 25]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from stream_layer import layer_parser, make_layers  # same layer shapes as the streaming benchmark


def main() -> None:
    parser = layer_parser(__doc__)
    parser.add_argument("--lora", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", default="benchmarks/results/profile_layer.txt")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    report = []
    for rank in sorted({0, args.lora}):
        args_r = argparse.Namespace(**{**vars(args), "layers": 1, "lora": rank})
        layer = make_layers(1, args_r, device)[0]
        layer.forced_target = "gpu"
        x = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        index = torch.rand(args.tokens, args.experts, device=device).topk(args.top_k, dim=-1).indices
        weights = torch.rand(args.tokens, args.top_k, device=device, requires_grad=True)

        def step() -> None:
            layer(x, index, weights).float().square().mean().backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=True) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60)
        report.append(f"## lora r={rank}, T={args.tokens}, 5 steps\n{table}")
        print(report[-1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
