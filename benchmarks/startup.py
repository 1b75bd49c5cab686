"""Probe: where the start-up crossover measurement's seconds go, piece by piece, for one full-size MoE layer.

`kllama chat` / `api` / `train` and `decode.py` measure the crossovers once per process when a layer's placement is
`auto` (`kllama.experts.crossover`). In a fresh process this script times, in order:

1. the CPU expert kernel's load (`kernel_status`; with `--torch-load`, first through torch's `load` as kllama did
   before: it runs ninja, which rebuilds when the source's modification time or path changed since the last build,
   e.g. `touch src/kllama/experts/csrc/expert_pass.cpp` first);
2. one layer's weights in pinned host memory, filled (what the engine holds; not part of the measurement);
3. the measurement on those weights (`measure_crossovers(weights=...)`, what the load runs), twice;
4. the measurement without them, building its own constant probe layer and pinning its own copy buffer.

Each measurement prints its pieces (`Crossovers.phases`): `probe layer`, `copy probe`, `cpu kernel`, `inference`,
`training`, `split`. Without CUDA the copy cannot be probed: the CPU side (`sample_crossovers`) runs against
`--bandwidth-gbps` (the H200 box's measured pinned copy by default). Writes JSON (benchmarks/results/startup_*.json).

Usage: python benchmarks/startup.py [--model v2lite] [--cpu-threads 16] [--expert-dtype bf16|int8|fp8|int4]
                                    [--torch-load] [--bandwidth-gbps 55] [--tiny]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from common import environment, log, model_config, write_results  # noqa: E402
from kllama.experts import cpu_kernels  # noqa: E402
from kllama.experts.crossover import (  # noqa: E402
    NEVER, Crossovers, measure_crossovers, measurement_note, probe_layer, sample_crossovers,
)
from kllama.experts.pinned import host_empty  # noqa: E402
from kllama.experts.quant import QUANT_DTYPES, ExpertWeight, quantize  # noqa: E402


PIECES = ("probe layer", "copy probe", "cpu kernel", "inference", "training", "split")  # in the order they run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("v2lite", "qwen3-30b", "qwen3-235b"), default="v2lite")
    p.add_argument("--cpu-threads", type=int, default=None, help="the measurement's CPU threads (default: torch's)")
    p.add_argument("--expert-dtype", choices=("bf16", *QUANT_DTYPES), default="bf16")
    p.add_argument("--torch-load", action="store_true",
                   help="load the CPU kernel through torch's load (ninja) first, as kllama did before")
    p.add_argument("--bandwidth-gbps", type=float, default=55.0,
                   help="without CUDA: the pinned host->GPU copy the CPU side is measured against")
    p.add_argument("--tiny", action="store_true", help="the tiny config's layer (smoke test)")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    return p.parse_args(argv)


def timed(name: str, fn: Any) -> tuple[Any, float]:
    """`fn()` and its wall seconds, logged."""
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    log(f"{name}: {seconds:.3f} s")
    return value, seconds


def kernel_load(torch_load: bool) -> dict[str, Any]:
    """The CPU kernel's load in this fresh process, optionally through torch's `load` (ninja) first."""
    name, build_dir, ldflags = cpu_kernels._library()
    cached = (build_dir / f"{name}.so").exists()
    out: dict[str, Any] = {"library": str(build_dir / f"{name}.so"), "cached_before": cached}
    if torch_load:
        _, out["torch_load_s"] = timed("kernel through torch's load (ninja runs)", lambda: cpu_kernels._build(
            name, build_dir, ldflags))
    status, out["kernel_status_s"] = timed("kernel_status", cpu_kernels.kernel_status)
    out["tiers"] = {str(k): v for k, v in status.tiers.items()}
    return out


def host_layer(hidden: int, inter: int, experts: int, expert_dtype: str) -> tuple[ExpertWeight, ExpertWeight]:
    """One layer's `(gate_up, down)` in pinned host memory (pinned only with CUDA), filled, quantized if asked."""
    shapes = ((experts, 2 * inter, hidden), (experts, hidden, inter))
    gate_up, down = (host_empty(s[0] * s[1] * s[2], torch.bfloat16, pin=True).view(s) for s in shapes)
    for weight in (gate_up, down):
        weight.normal_(0, 0.02)
    if expert_dtype == "bf16":
        return gate_up, down
    return quantize(gate_up, expert_dtype, projections=2), quantize(down, expert_dtype)


def shown(found: Crossovers) -> dict[str, Any]:
    """A measurement as the table and the JSON show it."""
    return {"inference": "never" if found.inference == NEVER else found.inference,
            "training": "never" if found.training == NEVER else found.training,
            "copy_ms": round(found.copy_s * 1e3, 2), "phases": dict(found.phases),
            "total_s": sum(s for _, s in found.phases), "samples": found.samples,
            "expert_samples": found.expert_samples}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = model_config(args.model, tiny=args.tiny, layers=1)
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    experts = getattr(config, "n_routed_experts", None) or config.num_experts
    top_k = config.num_experts_per_tok
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.empty(1, device=device)  # the CUDA context exists before a model's measurement
    result: dict[str, Any] = {"benchmark": "startup", "model": args.model, "expert_dtype": args.expert_dtype,
                              "shape": {"hidden": hidden, "inter": inter, "experts": experts, "top_k": top_k},
                              "cpu_threads": args.cpu_threads, "environment": environment()}
    result["kernel"] = kernel_load(args.torch_load)
    (gate_up, down), result["layer_build_s"] = timed("one layer's weights, pinned and filled (not measured)",
                                                     lambda: host_layer(hidden, inter, experts, args.expert_dtype))
    runs: dict[str, Crossovers] = {}
    scheme = None if args.expert_dtype == "bf16" else args.expert_dtype
    if cuda:
        for label in ("on the layer's weights", "again on them"):
            runs[label] = measure_crossovers(hidden, inter, experts, top_k, torch.bfloat16, device,
                                             cpu_threads=args.cpu_threads, scheme=scheme, weights=(gate_up, down))
        runs["with a built probe layer"] = measure_crossovers(hidden, inter, experts, top_k, torch.bfloat16, device,
                                                              cpu_threads=args.cpu_threads, scheme=scheme)
    else:
        log(f"no CUDA: the CPU side only, against a {args.bandwidth_gbps} GB/s copy")
        _, result["probe_layer_s"] = timed("a constant probe layer built (what a measurement without weights does)",
                                           lambda: probe_layer(hidden, inter, experts, torch.bfloat16, scheme))
        for label in ("CPU side on the layer's weights", "again"):
            runs[label] = sample_crossovers(gate_up, down, top_k, args.bandwidth_gbps * 1e9,
                                            cpu_threads=args.cpu_threads)
    for label, found in runs.items():
        log(f"{label}: {measurement_note([found])}; crossovers {found.inference} / {found.training}")
    seen = list(dict.fromkeys(name for found in runs.values() for name, _ in found.phases))
    names = sorted(seen, key=lambda name: PIECES.index(name) if name in PIECES else len(PIECES))
    width = max(len(label) for label in runs)
    print(f"\n{'measurement':<{width}}  " + "  ".join(f"{n:>11}" for n in names) + "      total")
    for label, found in runs.items():
        phases = dict(found.phases)
        cells = "  ".join(f"{phases[n]:>11.3f}" if n in phases else f"{'-':>11}" for n in names)
        print(f"{label:<{width}}  {cells}  {sum(phases.values()):>9.3f}")
    result["measurements"] = {label: shown(found) for label, found in runs.items()}
    path = write_results(result, f"startup_{args.model}{'_tiny' if args.tiny else ''}_{args.expert_dtype}",
                         args.out_dir)
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
