"""Benchmark: one DeepSeek-V2-Lite-shaped MoE layer streamed from pinned host memory, forward + backward.

Prints a table and writes benchmarks/results/stream_layer.json. Needs CUDA. Shapes default to V2-Lite (64 experts,
top-6, hidden 2048, width 1408, bf16) at 4,096 tokens with random weights and routing. Rows:
  copy       one layer's weights host->GPU alone (the floor for a streamed pass)
  compute    fwd + bwd on resident weights (the `gpu` target; the backward reuses the saved pre-activations)
  stream x1  one streamed layer fwd + bwd (one copy: backward finds the layer still resident)
  stream xN  N layers chained (h = h + layer(h)), fwd + bwd, showing copy/compute overlap
`ratio` = time / (bytes actually copied / measured copy bandwidth); the target for streaming is <= 1.3.

Usage: python benchmarks/stream_layer.py [--tokens 4096] [--layers 4] [--lora 8] [--cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kllama.experts import ExpertPlacement, ExpertStreamer, HostExperts
from kllama.experts.lora import ExpertLoRA


def make_layers(n: int, args: argparse.Namespace, device: torch.device) -> list[HostExperts]:
    layers = []
    for i in range(n):
        gate_up = (torch.randn(args.experts, 2 * args.inter, args.hidden, device=device, dtype=torch.bfloat16) * 0.02)
        down = torch.randn(args.experts, args.hidden, args.inter, device=device, dtype=torch.bfloat16) * 0.02
        layer = HostExperts(gate_up, down, torch.nn.SiLU(), ExpertPlacement.from_mode("stream"),
                            f"model.layers.{i}.mlp.experts", compute_device=device)
        del gate_up, down
        if args.lora:
            shapes = {"gate_up_proj": (args.hidden, 2 * args.inter), "down_proj": (args.inter, args.hidden)}
            for target, (fin, fout) in shapes.items():
                lora = ExpertLoRA(args.experts, fin, fout, args.lora, 2 * args.lora, device=device, dtype=torch.float32)
                lora.reset_parameters()
                layer.lora[target] = lora
        layers.append(layer)
    torch.cuda.empty_cache()
    return layers


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_parser(description: str) -> argparse.ArgumentParser:
    """Arguments for one V2-Lite-shaped layer (defaults: 64 experts, top-6, hidden 2048, width 1408, 4,096 tokens)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=1408)
    return parser


def main() -> None:
    parser = layer_parser(__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lora", type=int, default=0, help="expert LoRA rank (0 = none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="also time the cpu target (slow)")
    parser.add_argument("--out", default="benchmarks/results/stream_layer.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    layers = make_layers(args.layers, args, device)
    layer_bytes = layers[0].host_bytes()
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    index = torch.rand(args.tokens, args.experts, device=device).topk(args.top_k, dim=-1).indices  # [T, K]
    weights = torch.rand(args.tokens, args.top_k, device=device, requires_grad=True)

    # copy alone: pinned host -> GPU, one layer
    gate_up, down = layers[0].host_weights()
    dst = [torch.empty_like(gate_up, device=device), torch.empty_like(down, device=device)]
    copy_s = timed(lambda: (dst[0].copy_(gate_up, non_blocking=True), dst[1].copy_(down, non_blocking=True)),
                   args.repeats)
    del dst
    bandwidth = layer_bytes / copy_s

    def pass_over(stack: list[HostExperts], target: str) -> None:
        for layer in stack:
            layer.forced_target = target
        h = x
        for layer in stack:
            h = h + layer(h, index, weights)
        h.float().square().mean().backward()

    rows = []

    def record(name: str, seconds: float, copies: int) -> None:
        floor = copies * layer_bytes / bandwidth
        rows.append({"case": name, "ms": seconds * 1e3, "copies": copies,
                     "ratio_to_copy_floor": seconds / floor if floor else None})

    record("copy (1 layer)", copy_s, 1)
    compute_s = timed(lambda: pass_over(layers[:1], "gpu"), args.repeats)
    layers[0].drop_resident()
    record("compute fwd+bwd (resident)", compute_s, 0)

    def streamed(stack: list[HostExperts]) -> tuple[float, int]:
        streamer = ExpertStreamer(stack, device, trace=True)
        for layer in stack:
            layer.streamer = streamer
        def one_pass() -> None:
            streamer.invalidate()  # as in a real model: other layers have taken the slots since the last pass
            pass_over(stack, "stream")

        seconds = timed(one_pass, args.repeats)
        copies = len(streamer.copies) // (args.repeats + 1)
        return seconds, copies

    s1, c1 = streamed(layers[:1])
    record("stream x1 fwd+bwd", s1, c1)
    sn, cn = streamed(layers)
    record(f"stream x{args.layers} fwd+bwd", sn, cn)
    overlap_floor = max(cn * copy_s, args.layers * compute_s)
    if args.cpu:
        layer = layers[0]
        layer.forced_target = "cpu"
        start = time.perf_counter()
        pass_over([layer], "cpu")
        record("cpu fwd+bwd (1 layer)", time.perf_counter() - start, 0)

    print(f"V2-Lite-shaped layer: E={args.experts} top-{args.top_k} H={args.hidden} I={args.inter} bf16, "
          f"T={args.tokens}, lora r={args.lora}; {layer_bytes / 2**20:.0f} MiB/layer, "
          f"copy {bandwidth / 1e9:.1f} GB/s")
    print(f"{'case':32s} {'ms':>9s} {'copies':>7s} {'x copy floor':>13s}")
    for row in rows:
        ratio = f"{row['ratio_to_copy_floor']:.2f}" if row["ratio_to_copy_floor"] else "-"
        print(f"{row['case']:32s} {row['ms']:9.2f} {row['copies']:7d} {ratio:>13s}")
    print(f"stream x{args.layers}: {sn * 1e3:.1f} ms vs max(copies, compute) = {overlap_floor * 1e3:.1f} ms "
          f"(x{sn / overlap_floor:.2f}); serial copies+compute would be "
          f"{(cn * copy_s + args.layers * compute_s) * 1e3:.1f} ms")
    result = {"args": vars(args), "layer_bytes": layer_bytes, "copy_GBps": bandwidth / 1e9, "rows": rows,
              "multi_layer_overlap_ratio": sn / overlap_floor, "device": torch.cuda.get_device_name()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
