"""Probe: how close the CPU expert pass of decode comes to the host's memory read bandwidth.

At batch 1 a CPU expert pass is a handful of matrix-vector products over bf16 weights, so it is bound by memory
bandwidth. In a real decode every layer reads other experts, so the weights come from DRAM, not from the L3 cache
(one layer's top-6 experts, 99 MiB at the V2-Lite shape, would fit the H200 box's 300 MiB L3): every timed call
here moves on to the next of `--layers` weight sets (8 x 1.1 GB by default), so no call finds its weights cached.
For a few thread counts this measures:
* the host's read bandwidth (a float32 sum over one layer's gate_up weights, ~740 MB);
* the raw GEMVs of one token's top-k experts (`x @ W.T`, `F.linear`, `torch.mv`, `W @ x`);
* the engine's no-grad CPU layer pass at each `--tokens` count: the C++ kernel (`experts/cpu_kernels.py`) on each
  instruction-set path above scalar this CPU runs, with bf16 weights, int8 weights + per-row scales and int4 weights
  (two a byte) + per-row 64-column group scales; the torch path (`cpu_infer_forward(use_kernel=False)`); and the
  shared training math (`routed_experts_math`); each as GB/s of the distinct experts' weights (and scales) it must
  read and as a share of the read bandwidth (the issue's bar: >= 80 %). With one token, torch's int8 weight-only
  kernel per expert (`torch._weight_int8pack_mm`) is a row too.
Writes JSON (default benchmarks/results/cpu_gemv.json). CPU only (runs anywhere; compare rows of one run).

`--kernel-only` measures the C++ kernel alone, per weight dtype (bf16, int8, fp8, int4) and instruction-set path:
each call runs one layer's `--top-k` experts for `--tokens` tokens, and consecutive calls read disjoint expert sets of
one `--top-k x --layers`-expert tensor per dtype (so no memory is spent on unselected experts; make the cycled bytes,
printed, several times the L3 cache). GB/s counts the weight and scale bytes a call must read. Calls go to the
extension's function directly (since the fourteenth session; earlier rows went through `expert_layer`, whose Python
added ~10-30 us a call). `--compare-source old.cpp,...` builds each file (another copy of
`csrc/expert_pass.cpp`: a variant, or an older commit's) as its own extension and times it interleaved with this
checkout's kernel, round by round (`--rounds`), and prints each variant's time as a multiple of the tree's (the median
of the rounds' ratios): on the H200 boxes separate runs of one unchanged kernel differed by up to 30 %, more than the
changes tried (benchmarks/NOTES.md, fourteenth session).

`--team spin` times each call as a captured decode step runs its passes: a `HostJob` per weight set, run on this
thread, whose row stages go to the kernel's own spinning thread team (OpenMP's team sleeps between passes when torch
holds another one); the default, `omp`, calls `expert_pass`, OpenMP's team.

`--routed E` times each dtype's kernel a second way, interleaved with the cycled sets round by round (`--rounds`):
over weights laid out as decode holds them, `--layers` layers of E experts each in the engine's host buffers
(`pinned.host_empty`: huge pages, page-locked where CUDA is), each call reading a random top-k of the next layer's E
experts. Its `x cycled` column is its time over the cycled sets' (the median of the rounds' ratios): above 1, decode's
weights cost the kernel more than the benchmark's do. The JSON also records, after allocation, how many GB of the
process sit on each NUMA node.

`--layer-pass` measures the hop around the kernel: per weight dtype, one decode layer's pass through `HostExperts`
(what the engine runs: x, routing and output on the GPU when there is one, else on the host) next to the kernel
alone on host copies of the same inputs, over `--layers` modules of `--top-k` experts each, and prints both and their
difference (the overhead a layer pays outside the kernel). With a small `--hidden`/`--inter` the kernel is cheap and
the overhead stands out. A third row times the HostExperts pass after `--idle-ms` of sleep before each call, as in
decode, where the kernel's threads wait while the GPU runs the rest of a layer (and may fall asleep). With a GPU,
`hop: ...` rows time the device pieces of the hop alone (an idle stream sync, the copies to pinned host buffers and
back, each with its sync), and three rows time the kernel on pinned inputs with a bf16 output, the kernel right after
an idle stream sync, and the HostExperts pass with x on the host (its Python and allocation, no device work), to tell
where a pass's time outside the kernel goes. `--profile-pass N` prints cProfile's table over N passes with x on
the host.

Usage: python benchmarks/cpu_gemv.py [--threads 16,8] [--tokens 1,4,16] [--layers 8] [--experts 64]
                                     [--hidden 2048] [--inter 1408] [--top-k 6]
       python benchmarks/cpu_gemv.py --kernel-only [--threads 16,8] [--tokens 1] [--layers 24] [--isas avx2,...]
                                     [--dtypes bf16,int8,fp8,int4] [--compare-source old.cpp] [--rounds 8]
                                     [--team omp|spin]
                                     [--routed 64]
       python benchmarks/cpu_gemv.py --layer-pass [--threads 16] [--tokens 1] [--layers 24] [--dtypes ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.nn.functional import linear, silu

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import node_split_text, numa_nodes, process_gb_by_node  # noqa: E402
from kllama.experts.cpu_compute import cpu_infer_forward, kernel_operands  # noqa: E402
from kllama.experts.cpu_kernels import (  # noqa: E402
    ISAS, KERNEL_LABELS, expert_layer, kernel_isas, kernel_status, load_kernel_source,
)
from kllama.experts.crossover import median_seconds  # noqa: E402
from kllama.experts.module import HostExperts  # noqa: E402
from kllama.experts.pinned import pinned_copy  # noqa: E402
from kllama.experts.placement import ExpertPlacement  # noqa: E402
from kllama.experts.quant import BLOCK, INT4_GROUP, quantize  # noqa: E402
from kllama.experts.routed import routed_experts_math  # noqa: E402


def print_rows(rows: list[dict], width: int) -> None:
    """The rows as a table: variant (`width` wide), threads, tokens, ms, GB/s, % of the read bandwidth."""
    print(f"{'variant':{width}s} {'threads':>7s} {'tokens':>6s} {'ms':>8s} {'GB/s':>7s} {'% read':>7s}")
    for row in rows:
        print(f"{row['variant']:{width}s} {row['threads']:7d} {row['tokens']:6d} {row['ms']:8.3f} "
              f"{row['GB_per_s']:7.1f} {row['pct_of_read']:7.0f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="16,8")
    parser.add_argument("--tokens", default="1,4,16", help="token counts of the layer-pass rows")
    parser.add_argument("--layers", type=int, default=8, help="weight sets cycled through (defeats the L3 cache)")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=1408)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu_gemv.json, with "
                        "--kernel-only cpu_kernel.json)")
    parser.add_argument("--kernel-only", action="store_true",
                        help="only the C++ kernel: GB/s per weight dtype and instruction-set path")
    parser.add_argument("--layer-pass", action="store_true",
                        help="a layer's pass through HostExperts next to the kernel alone, and the difference")
    parser.add_argument("--profile-pass", type=int, default=0,
                        help="--layer-pass: also print cProfile's top functions (by own time) over this many "
                             "HostExperts passes with x on the host, the path's Python without device work")
    parser.add_argument("--idle-ms", type=float, default=0.5,
                        help="--layer-pass: sleep before each call of its 'after idle' row")
    parser.add_argument("--compare-source", default="",
                        help="with --kernel-only: comma list of other copies of csrc/expert_pass.cpp (variants, an "
                             "older commit's: `git show REV:src/kllama/experts/csrc/expert_pass.cpp > old.cpp`), each "
                             "built and timed interleaved with this checkout's kernel over --rounds rounds")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds with --compare-source or --routed")
    parser.add_argument("--routed", type=int, default=0, help="with --kernel-only: also time the kernel over --layers "
                        "layers of this many experts in the engine's host buffers, a random top-k a call (decode's "
                        "layout), interleaved with the cycled sets")
    parser.add_argument("--team", default="omp", choices=("omp", "spin"),
                        help="with --kernel-only: omp calls `expert_pass` (OpenMP's team, as a pass called from "
                        "Python runs); spin runs a `HostJob` per weight set on this thread (the kernel's own "
                        "spinning team, as a captured decode step's passes run)")
    parser.add_argument("--isas", default="", help="kernel paths to time with --kernel-only (default: all above "
                        "scalar this CPU runs)")
    parser.add_argument("--dtypes", default="bf16,int8,fp8", help="weight dtypes to time with --kernel-only or "
                        "--layer-pass (int4 too: --layer-pass quantizes it with quant.py's scheme of that name)")
    args = parser.parse_args(argv)
    if args.team == "spin" and args.routed:
        parser.error("--team spin times the cycled sets only: run --routed apart")
    if args.routed and args.compare_source:
        parser.error("--routed and --compare-source time different things: run them apart")
    if args.routed and args.routed < args.top_k:
        parser.error(f"--routed {args.routed} is fewer experts than --top-k {args.top_k}")
    return args


class Cycle:
    """Calls `fn(layer)` on the next of `n` layers at each call (so consecutive calls read different weights)."""

    def __init__(self, fn: Callable[[int], object], n: int) -> None:
        self.fn, self.n, self.i = fn, n, 0

    def __call__(self) -> object:
        self.i = (self.i + 1) % self.n
        return self.fn(self.i)


def kernel_weights(dtype: str, experts: int, hidden: int, inter: int) -> tuple[tuple[Tensor, Tensor], dict]:
    """(gate_up, down) of `experts` experts in `dtype` (constant values: they do not change the kernel's time) and
    the kernel's scale keywords."""
    if dtype == "bf16":
        return (torch.full((experts, 2 * inter, hidden), 0.01, dtype=torch.bfloat16),
                torch.full((experts, hidden, inter), 0.01, dtype=torch.bfloat16)), {}
    if dtype == "int8":
        return (torch.ones(experts, 2 * inter, hidden, dtype=torch.int8),
                torch.ones(experts, hidden, inter, dtype=torch.int8)), {
            "gate_up_scale": torch.full((experts, 2 * inter), 0.01), "down_scale": torch.full((experts, hidden), 0.01)}
    if dtype == "int4":  # byte 0x89: columns of q = 1 and 0; one fp32 scale per row and 64-column group
        groups = -(-hidden // INT4_GROUP), -(-inter // INT4_GROUP)
        return (torch.full((experts, 2 * inter, hidden // 2), 0x89, dtype=torch.uint8),
                torch.full((experts, hidden, inter // 2), 0x89, dtype=torch.uint8)), {
            "gate_up_scale": torch.full((experts, 2 * inter, groups[0]), 0.01),
            "down_scale": torch.full((experts, hidden, groups[1]), 0.01)}
    fp8 = torch.float8_e4m3fn
    blocks = -(-inter // BLOCK), -(-hidden // BLOCK)  # quant.py's 128x128 grid: gate and up rows on their own
    return (torch.full((experts, 2 * inter, hidden), 0.5).to(fp8), torch.full((experts, hidden, inter), 0.5).to(fp8)), {
        "gate_up_scale": torch.full((experts, 2 * blocks[0], blocks[1]), 0.01),
        "down_scale": torch.full((experts, blocks[1], blocks[0]), 0.01)}


def engine_layer(dtype: str, experts: int, hidden: int, inter: int) -> tuple[Tensor, Tensor, dict]:
    """One layer's `experts` experts in `dtype`, each tensor copied into the engine's host buffers (`pinned_copy`:
    huge pages, page-locked where CUDA is), as `HostExperts` holds them for decode."""
    (gate_up, down), scales = kernel_weights(dtype, experts, hidden, inter)
    return pinned_copy(gate_up), pinned_copy(down), {key: pinned_copy(value) for key, value in scales.items()}


def kernel_only(args: argparse.Namespace) -> dict:
    """The C++ kernel's GB/s per dtype and instruction-set path (see the module docstring)."""
    H, I, K, L, E = args.hidden, args.inter, args.top_k, args.layers, args.routed  # noqa: N806
    isas = args.isas.split(",") if args.isas else [isa for isa in kernel_isas() if isa != "scalar"]
    if not isas:
        print(f"no kernel path to time: {kernel_status().reason or 'this CPU runs the scalar path only'}")
    tokens_list = [int(t) for t in args.tokens.split(",")]
    compare = bool(args.compare_source)
    modules = kernel_variants(args.compare_source) if isas else {}
    rounds = args.rounds if compare or E else 1
    rows, sets, routed = [], {}, {}
    for dtype in args.dtypes.split(","):
        (gate_up, down), scales = kernel_weights(dtype, K * L, H, I)
        per_expert = sum(t[0].numel() * t.element_size() for t in (gate_up, down, *scales.values()))
        sets[dtype] = (gate_up, down, scales, per_expert)
        print(f"{dtype}: {K} experts x {per_expert / 1e6:.2f} MB per call, {L} disjoint sets cycled "
              f"({K * L * per_expert / 2**20:.0f} MiB)")
        if E:
            routed[dtype] = [engine_layer(dtype, E, H, I) for _ in range(L)]
            print(f"{dtype}: routed, a random {K} of {E} experts of the next of {L} layers in the engine's host "
                  f"buffers ({E * L * per_expert / 2**20:.0f} MiB)")
    by_node = process_gb_by_node()  # where the weights landed (threads reading another node's memory read slower)
    print(f"host memory of this process: {sum(by_node.values()):.1f} GB" + node_split_text(by_node))
    gen = torch.Generator().manual_seed(0)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        largest = max((entry[0] for entry in sets.values()), key=lambda t: t.numel() * t.element_size())
        read_s = median_seconds(lambda: largest.view(torch.float32).sum(), max(3, args.repeats // 4))
        read_bw = largest.numel() * largest.element_size() / read_s
        rows.append({"variant": "read bandwidth (float32 sum)", "threads": threads, "tokens": 0,
                     "ms": read_s * 1e3, "GB_per_s": read_bw / 1e9, "pct_of_read": 100.0})
        for tokens in tokens_list:
            x = torch.randn(tokens, H, generator=gen).bfloat16()
            weights = torch.rand(tokens, K, generator=gen)
            # each call's tokens choose among the next disjoint set of K experts (every token: all K of them)
            index = [torch.stack([torch.randperm(K, generator=gen) + j * K for _ in range(tokens)]) for j in range(L)]
            # --routed: 8 random routings a layer (each token a random K of E), the next one each time round
            routes = [[torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)]) for _ in range(8)]
                      for _ in range(L)] if E else []
            out = torch.empty(tokens, H)
            for isa in isas:
                for dtype, (gate_up, down, scales, per_expert) in sets.items():
                    if args.team == "spin":
                        calls = {label: Cycle(lambda j, jobs=[module.HostJob(
                            x, index[j], weights, gate_up, down, scales.get("gate_up_scale"),
                            scales.get("down_scale"), None, None, None, None, out, ISAS[isa], threads)
                            for j in range(L)]: jobs[j].run(), L) for label, module in modules.items()}
                    else:
                        calls = {label: Cycle(lambda j, module=module, gate_up=gate_up, down=down, scales=scales,
                                              isa=isa: direct_pass(module, x, index[j], weights, gate_up, down,
                                                                   scales, out, ISAS[isa]), L)
                                 for label, module in modules.items()}
                    if E:
                        calls = {CYCLED: calls[TREE], f"routed over {E}": Cycle(
                            lambda i, layers=routed[dtype], isa=isa: direct_pass(
                                modules[TREE], x, routes[i % L][i // L], weights, *layers[i % L], out, ISAS[isa]),
                            8 * L)}
                    for label, (seconds, ratio) in interleaved_seconds(calls, args.repeats, rounds).items():
                        gbs = K * per_expert / seconds / 1e9
                        rows.append({"variant": f"kernel {isa} {dtype}" + (f" [{label}]" if len(calls) > 1 else ""),
                                     "threads": threads, "tokens": tokens, "ms": seconds * 1e3, "GB_per_s": gbs,
                                     "pct_of_read": 100 * gbs * 1e9 / read_bw, "source": label,
                                     ("x_cycled_time" if E else "x_tree_time"): ratio})
    print(f"CPU expert kernel alone, top-{K} experts, H={H} I={I}; tiers in use: "
          f"{ {KERNEL_LABELS[d]: t for d, t in kernel_status().tiers.items()} }")
    print_rows(rows, 48 if compare or E else 32)
    if compare or E:
        key, first, what = ("x_tree_time", TREE, "the tree's") if compare else ("x_cycled_time", CYCLED,
                                                                                 "over the cycled sets")
        print(f"interleaved over {rounds} rounds; time / time {what}, median of the rounds' ratios:")
        for row in rows:
            if row.get(key) is not None and row["source"] != first:
                print(f"  {row['variant']:48s} {row['threads']:3d} threads {row['tokens']:3d} tokens {row[key]:.3f}x")
    return {"args": vars(args), "rows": rows, "cpu_count": torch.get_num_threads(), "kernel_isa": kernel_status().isa,
            "numa_nodes": numa_nodes(), "process_gb_by_node": by_node}


TREE = "tree"  # the kernel of this checkout, in --compare-source rows
CYCLED = "cycled sets"  # --routed rows' baseline: the disjoint sets cycled


def direct_pass(module: ModuleType, x: Tensor, index: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor,
                scales: dict, out: Tensor, isa: int) -> Tensor:
    """One call of a built kernel's `expert_pass` on host tensors, no LoRA, on instruction-set tier `isa`: the
    kernel alone, without `expert_layer`'s checks (~10-30 us a call in Python)."""
    error = module.expert_pass(x, index, weights, gate_up, down, scales.get("gate_up_scale"),
                               scales.get("down_scale"), None, None, None, None, out, isa)
    if error:
        raise RuntimeError(error)
    return out


def kernel_variants(compare: str) -> dict[str, ModuleType]:
    """This checkout's kernel and each `--compare-source` file's build, by label (the file name; its path where two
    names agree)."""
    modules: dict[str, ModuleType] = {TREE: kernel_status().module}
    paths = [Path(path) for path in compare.split(",") if path]
    names = [path.name for path in paths]
    for path in paths:
        modules[path.name if names.count(path.name) == 1 else str(path)] = load_kernel_source(path)
    return modules


def interleaved_seconds(calls: dict[str, Callable[[], object]], repeats: int, rounds: int,
                        ) -> dict[str, tuple[float, float | None]]:
    """Per label: the median over `rounds` of each round's median call time (`repeats` calls), and the median of
    its per-round ratio to the first label's time (None for the first). Each round times every label once, the
    order rotated round to round, so a host whose speed drifts between runs (the H200 boxes moved the same kernel by
    +-30 %) slows every variant of a round alike and the paired ratios keep what the variants change."""
    labels = list(calls)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label].append(median_seconds(calls[label], repeats))
    base = times[labels[0]]
    return {label: (statistics.median(values),
                    statistics.median(t / b for t, b in zip(values, base)) if label != labels[0] else None)
            for label, values in times.items()}


def after_idle(fn: Callable[[], object], repeats: int, idle_s: float) -> float:
    """Median wall time of `repeats` calls of `fn`, each after `idle_s` of sleep (not timed)."""
    fn()
    times = []
    for _ in range(repeats):
        time.sleep(idle_s)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_pass(args: argparse.Namespace) -> dict:
    """A decode layer's pass through `HostExperts` next to the kernel alone (see the module docstring)."""
    H, I, K, L = args.hidden, args.inter, args.top_k, args.layers  # noqa: N806
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        placement = ExpertPlacement("cpu", "cpu", cpu_threads=threads)
        for dtype in args.dtypes.split(","):
            scheme = None if dtype == "bf16" else dtype
            modules = []
            for j in range(L):  # constant values (fast to make; the kernel's time does not depend on them)
                gate_up = torch.full((K, 2 * I, H), 0.01, dtype=torch.bfloat16)  # [K, 2I, H]
                down = torch.full((K, H, I), 0.01, dtype=torch.bfloat16)  # [K, H, I]
                if scheme is not None:
                    gate_up, down = quantize(gate_up, scheme, projections=2), quantize(down, scheme)
                modules.append(HostExperts(gate_up, down, silu, placement, f"layer{j}", compute_device=device))
            operands = [kernel_operands(*m.host_weights()) for m in modules]
            for tokens in [int(t) for t in args.tokens.split(",")]:
                x = torch.randn(tokens, H, generator=gen).bfloat16()
                index = torch.stack([torch.randperm(K, generator=gen) for _ in range(tokens)])  # [T, K]: all K
                weights = torch.rand(tokens, K, generator=gen)
                xd, index_d, weights_d = x.to(device), index.to(device), weights.to(device)

                def kernel(j: int, x=x, index=index, weights=weights) -> object:  # noqa: ANN001
                    gate_up, down, scales = operands[j]
                    return expert_layer(x, index, weights, gate_up, down, **scales)

                def module_pass(j: int, xd=xd, index_d=index_d, weights_d=weights_d) -> object:  # noqa: ANN001
                    with torch.no_grad():
                        out = modules[j](xd, index_d, weights_d)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    return out

                def host_module_pass(j: int, x=x, index=index, weights=weights) -> object:  # noqa: ANN001
                    with torch.no_grad():
                        return modules[j](x, index, weights)

                # interleaved rounds, each variant's best round median: the dev box's other load comes and goes
                times: dict[str, list[float]] = {"kernel alone": [], "HostExperts pass": [],
                                                 "HostExperts pass after idle": []}
                for _ in range(5):
                    times["kernel alone"].append(median_seconds(Cycle(kernel, L), args.repeats))
                    times["HostExperts pass"].append(median_seconds(Cycle(module_pass, L), args.repeats))
                    times["HostExperts pass after idle"].append(
                        after_idle(Cycle(module_pass, L), args.repeats, args.idle_ms / 1e3))
                if device.type == "cuda":  # the hop's device pieces, each timed alone, and the kernel around them
                    for name, fn in hop_pieces(xd, index_d, weights_d).items():
                        times[name] = [median_seconds(fn, args.repeats) for _ in range(5)]
                    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
                              for t in (x, index, weights, x)]
                    stream = torch.cuda.current_stream(device)

                    def kernel_pinned(j: int, pinned=pinned) -> object:  # noqa: ANN001
                        gate_up, down, scales = operands[j]
                        return expert_layer(*pinned[:3], gate_up, down, out=pinned[3], **scales)

                    def kernel_after_sync(j: int) -> object:
                        stream.synchronize()
                        return kernel(j)

                    for name, fn in {"kernel on pinned inputs, bf16 out": kernel_pinned,
                                     "kernel after an idle stream sync": kernel_after_sync,
                                     "HostExperts pass, x on the host": host_module_pass}.items():
                        times[name] = [median_seconds(Cycle(fn, L), args.repeats) for _ in range(5)]
                if args.profile_pass:
                    print(f"cProfile, {args.profile_pass} HostExperts passes ({dtype}, x on the host):")
                    print(profile_passes(host_module_pass, L, args.profile_pass))
                best = {name: min(values) * 1e3 for name, values in times.items()}
                for name, ms in best.items():
                    rows.append({"variant": f"{name} {dtype}", "threads": threads, "tokens": tokens, "ms": ms})
                rows.append({"variant": f"overhead {dtype}", "threads": threads, "tokens": tokens,
                             "ms": best["HostExperts pass"] - best["kernel alone"]})
    print(f"a layer's pass through HostExperts (x on {device}) vs the kernel alone, top-{K} experts, H={H} I={I}, "
          f"{L} layers cycled")
    print(f"{'variant':34s} {'threads':>7s} {'tokens':>6s} {'ms':>8s}")
    for row in rows:
        print(f"{row['variant']:34s} {row['threads']:7d} {row['tokens']:6d} {row['ms']:8.3f}")
    return {"args": vars(args), "rows": rows, "device": str(device), "kernel_isa": kernel_status().isa}


def profile_passes(fn: Callable[[int], object], layers: int, count: int, rows: int = 15) -> str:
    """cProfile's table (top `rows` functions by own time) over `count` calls of `fn(layer)`, layers cycled: where
    a pass's time goes outside the kernel (whose call shows as one C function)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for j in range(count):
        fn(j % layers)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    return text.getvalue()


def hop_pieces(x: Tensor, index: Tensor, weights: Tensor) -> dict[str, Callable[[], object]]:
    """What a CPU pass of decode asks of the device around the kernel (`cpu_compute.kernel_pass`), piece by piece:
    an idle stream sync; x alone and all three inputs copied to pinned buffers, then a sync; the output copied
    back from a pinned buffer, then a sync."""
    stream = torch.cuda.current_stream(x.device)
    staged = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (x, index, weights)]
    result = torch.empty_like(x)

    def copies_in(count: int) -> None:
        for host, source in list(zip(staged, (x, index, weights)))[:count]:
            host.copy_(source, non_blocking=True)
        stream.synchronize()

    def copy_out() -> None:
        result.copy_(staged[0], non_blocking=True)
        stream.synchronize()

    return {"hop: idle stream sync": stream.synchronize, "hop: x to host + sync": lambda: copies_in(1),
            "hop: x, index, weights to host + sync": lambda: copies_in(3), "hop: output to device + sync": copy_out}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.kernel_only or args.layer_pass:
        results = kernel_only(args) if args.kernel_only else layer_pass(args)
        default = "cpu_kernel.json" if args.kernel_only else "cpu_layer_pass.json"
        out = Path(args.out or f"benchmarks/results/{default}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
        return results
    torch.manual_seed(0)
    E, H, I, K, L = args.experts, args.hidden, args.inter, args.top_k, args.layers  # noqa: N806
    # weight values do not change GEMV time; a constant fill is much faster than random init at full size
    gate_up = [torch.full((E, 2 * I, H), 0.01, dtype=torch.bfloat16) for _ in range(L)]  # [E, 2I, H] per layer
    down = [torch.full((E, H, I), 0.01, dtype=torch.bfloat16) for _ in range(L)]  # [E, H, I]
    expert_bytes = (gate_up[0][0].numel() + down[0][0].numel()) * gate_up[0].element_size()
    isas = [isa for isa in kernel_isas() if isa != "scalar"]
    # int8 (per-row scales) and int4 (per-row 64-column group scales): ((gate_up, down), scale keywords) per layer
    quantized = {dtype: [kernel_weights(dtype, E, H, I) for _ in range(L)] if isas else []
                 for dtype in ("int8", "int4")}
    quant_bytes = {dtype: sum(t[0].numel() * t.element_size() for t in (*layers[0][0], *layers[0][1].values()))
                   for dtype, layers in quantized.items() if layers}  # one expert's values and fp32 scales
    int8_bytes = quant_bytes.get("int8", 0)
    experts = torch.randperm(E)[:K].tolist()
    x, act = torch.randn(1, H, dtype=torch.bfloat16), torch.randn(1, I, dtype=torch.bfloat16)
    gemvs = {
        "x @ W.T (bf16)": lambda j: [(x @ gate_up[j][e].T, act @ down[j][e].T) for e in experts],
        "F.linear (bf16)": lambda j: [(linear(x, gate_up[j][e]), linear(act, down[j][e])) for e in experts],
        "torch.mv (bf16)": lambda j: [(torch.mv(gate_up[j][e], x[0]), torch.mv(down[j][e], act[0])) for e in experts],
        "W @ x (bf16)": lambda j: [(gate_up[j][e] @ x.T, down[j][e] @ act.T) for e in experts],
    }
    int8_gemv = getattr(torch, "_weight_int8pack_mm", None)
    if quantized["int8"] and int8_gemv is not None:
        def int8_pack(j: int) -> list:
            (gu, dn), scales = quantized["int8"][j]
            gus, dns = scales["gate_up_scale"], scales["down_scale"]
            return [(int8_gemv(x, gu[e], gus[e].bfloat16()), int8_gemv(act, dn[e], dns[e].bfloat16()))
                    for e in experts]
        gemvs["torch._weight_int8pack_mm (int8)"] = int8_pack
    passes: dict[str, tuple[int, int, int, Callable[[int], object]]] = {}  # name: tokens, experts, bytes each, fn
    for tokens in [int(t) for t in args.tokens.split(",")]:
        xt = torch.randn(tokens, H, dtype=torch.bfloat16)
        index = torch.rand(tokens, E).topk(K, dim=-1).indices  # [T, K] distinct experts per token
        weights = torch.rand(tokens, K)
        touched = index.unique().numel()
        plural = "s" if tokens > 1 else ""
        for isa in isas:
            passes[f"kernel {isa} bf16, {tokens} token{plural}"] = (tokens, touched, expert_bytes, lambda j, xt=xt,
                index=index, weights=weights, isa=isa: expert_layer(xt, index, weights, gate_up[j], down[j], isa=isa))
            for dtype, layers in quantized.items():
                passes[f"kernel {isa} {dtype}, {tokens} token{plural}"] = (
                    tokens, touched, quant_bytes[dtype], lambda j, xt=xt, index=index, weights=weights, isa=isa,
                    layers=layers: expert_layer(xt, index, weights, *layers[j][0], isa=isa, **layers[j][1]))
        passes[f"torch layer pass, {tokens} token{plural}"] = (tokens, touched, expert_bytes, lambda j, xt=xt,
            index=index, weights=weights: cpu_infer_forward(xt, index, weights, gate_up[j], down[j], silu,
                                                            use_kernel=False))
        passes[f"shared expert math (before), {tokens} token{plural}"] = (tokens, touched, expert_bytes, lambda j,
            xt=xt, index=index, weights=weights: routed_experts_math(xt, index, weights, gate_up[j], down[j], silu))
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        probe = Cycle(lambda j: gate_up[j].view(torch.float32).sum(), L)  # reinterpreted bytes: read once each
        read_s = median_seconds(probe, max(3, args.repeats // 4))
        read_bw = gate_up[0].numel() * gate_up[0].element_size() / read_s
        rows.append({"variant": "read bandwidth (float32 sum)", "threads": threads, "tokens": 0,
                     "ms": read_s * 1e3, "GB_per_s": read_bw / 1e9, "pct_of_read": 100.0})
        for name, fn in gemvs.items():
            seconds = median_seconds(Cycle(fn, L), args.repeats)
            gbs = K * (int8_bytes if "int8" in name else expert_bytes) / seconds / 1e9
            rows.append({"variant": name, "threads": threads, "tokens": 1, "ms": seconds * 1e3, "GB_per_s": gbs,
                         "pct_of_read": 100 * gbs * 1e9 / read_bw})
        for name, (tokens, touched, nbytes, fn) in passes.items():
            seconds = median_seconds(Cycle(fn, L), args.repeats)
            gbs = touched * nbytes / seconds / 1e9
            rows.append({"variant": name, "threads": threads, "tokens": tokens, "experts_read": touched,
                         "ms": seconds * 1e3, "GB_per_s": gbs, "pct_of_read": 100 * gbs * 1e9 / read_bw})
    print(f"top-{K} of {E} experts, H={H} I={I}: {expert_bytes / 2**20:.1f} MiB of bf16 weights per expert, "
          f"{L} layers cycled; CPU expert kernel: {kernel_status().isa or kernel_status().reason}")
    print_rows(rows, 44)
    results = {"args": vars(args), "rows": rows, "cpu_count": torch.get_num_threads(),
               "kernel_isa": kernel_status().isa}
    out = Path(args.out or "benchmarks/results/cpu_gemv.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
