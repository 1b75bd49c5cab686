"""Host expert memory in 4 KiB pages against transparent huge pages (2 MiB): loading it, and decoding from it.

kllama's expert buffers (`kllama.experts.pinned.host_empty`) are advised `MADV_HUGEPAGE`. This measures what that buys,
in one process, alternating the two page kinds round by round (a GPU box's speed drifts between runs):
* `fill`: what the loader does per MoE layer: allocate a buffer of `--chunk-gb`, page-lock it when CUDA is available,
  and copy the layer's weights in (from memory already faulted in). GB/s over `--gb` in all.
* `kernel`: the C++ expert kernel's one-token pass (`--top-k` experts, `cpu_gemv.py --kernel-only`'s call) over
  weights held in each page kind, cycling `--layers` disjoint sets so every call reads DRAM. ms a call.
Prints a table with each row's huge-page time as a multiple of the small-page time (the median of the rounds'
ratios), the huge pages the kernel actually gave (`AnonHugePages`), and writes JSON.

Usage: python benchmarks/host_pages.py [--gb 8] [--chunk-gb 1] [--rounds 6] [--threads 16] [--dtypes bf16,int8]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, format_table, log, write_results  # noqa: E402
from cpu_gemv import Cycle, direct_pass, interleaved_seconds, kernel_weights  # noqa: E402
from kllama.experts.cpu_kernels import ISAS, kernel_status  # noqa: E402
from kllama.experts.pinned import host_empty  # noqa: E402

KINDS = {"4 KiB": False, "2 MiB": True}  # page kind -> host_empty's `huge`
COLUMNS = (
    ("row", "row", "{}"),
    ("pages", "pages", "{}"),
    ("value", "median", "{:.3f}"),
    ("unit", "unit", "{}"),
    ("x_small_pages", "x 4 KiB", "{:.3f}"),
    ("huge_gb", "huge pages GB", "{:.2f}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=8.0, help="bytes filled per round and page kind")
    p.add_argument("--chunk-gb", type=float, default=1.0, help="one buffer (a V2-Lite layer's experts: 1.1 GB)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--dtypes", default="bf16,int8", help="kernel rows' weight dtypes (bf16|int8|fp8|int4)")
    p.add_argument("--layers", type=int, default=24, help="kernel rows: disjoint expert sets cycled")
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--repeats", type=int, default=16)
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    return p.parse_args(argv)


def anon_huge_gb() -> float:
    """This process's anonymous memory in transparent huge pages (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def fill_rows(args: argparse.Namespace) -> list[dict]:
    """Allocate, pin (with CUDA) and fill `--gb` in `--chunk-gb` buffers per page kind, alternating kinds."""
    chunk = int(args.chunk_gb * 1e9) // 2  # bf16 elements
    count = max(1, round(args.gb / args.chunk_gb))
    source = torch.randn(chunk).bfloat16()  # faulted in once: the copy reads memory as the loader's page cache is
    pin = torch.cuda.is_available()
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    huge: dict[str, float] = {}
    for r in range(args.rounds):
        for kind in (list(KINDS) if r % 2 == 0 else list(KINDS)[::-1]):
            before = anon_huge_gb()
            began = time.perf_counter()
            buffers = []
            for _ in range(count):
                buf = host_empty(chunk, torch.bfloat16, pin=pin, huge=KINDS[kind])
                buf.copy_(source)
                buffers.append(buf)
            seconds = time.perf_counter() - began
            huge[kind] = anon_huge_gb() - before
            rates[kind].append(count * chunk * 2 / seconds / 1e9)
            del buffers, buf  # `buf` too: the last buffer would live into the next kind's round
            gc.collect()
        log(f"fill round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} GB/s" for k, v in rates.items()))
    small = rates["4 KiB"]
    return [{"row": f"fill {'+ pin ' if pin else ''}{args.chunk_gb:g} GB buffers", "pages": kind,
             "value": statistics.median(values), "unit": "GB/s", "huge_gb": huge[kind],
             "x_small_pages": statistics.median(s / v for s, v in zip(small, values)) if kind != "4 KiB" else None}
            for kind, values in rates.items()]


def kernel_rows(args: argparse.Namespace) -> list[dict]:
    """The expert kernel's one-token pass over weights in each page kind, interleaved round by round."""
    status = kernel_status()
    if status.module is None:
        log(f"no kernel rows: {status.reason}")
        return []
    torch.set_num_threads(args.threads)
    K, L = args.top_k, args.layers  # noqa: N806
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.hidden, generator=gen).bfloat16()
    weights = torch.rand(1, K, generator=gen)
    index = [(torch.randperm(K, generator=gen) + j * K).view(1, K) for j in range(L)]
    out = torch.empty(1, args.hidden)
    rows = []
    for dtype in args.dtypes.split(","):
        (gate_up, down), scales = kernel_weights(dtype, K * L, args.hidden, args.inter)
        nbytes = sum(t.numel() * t.element_size() for t in (gate_up, down))
        held, before = {}, anon_huge_gb()
        for kind, huge in KINDS.items():  # each kind's own copy of the same weights
            pair = [host_empty(t.numel(), t.dtype, pin=False, huge=huge).view(t.shape).copy_(t)
                    for t in (gate_up, down)]
            held[kind] = (pair, anon_huge_gb() - before)
            before = anon_huge_gb()
        del gate_up, down
        isa = ISAS[status.isa]
        calls = {kind: Cycle(lambda j, w=pair: direct_pass(status.module, x, index[j], weights, w[0], w[1], scales,
                                                          out, isa), L) for kind, (pair, _) in held.items()}
        for kind, (seconds, ratio) in interleaved_seconds(calls, args.repeats, args.rounds).items():
            rows.append({"row": f"kernel {dtype}, {K} experts, 1 token, {args.threads} threads", "pages": kind,
                         "value": seconds * 1e3, "unit": f"ms ({nbytes / L / seconds / 1e9:.0f} GB/s)",
                         "x_small_pages": ratio, "huge_gb": held[kind][1]})
        log(f"kernel {dtype} done")
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    log(f"host pages: fill {args.gb:g} GB in {args.chunk_gb:g} GB buffers, kernel {args.dtypes}, {args.rounds} "
        f"rounds; transparent huge pages: {thp.read_text().strip() if thp.exists() else 'absent'}")
    rows = fill_rows(args) + kernel_rows(args)
    print(format_table(rows, COLUMNS))
    result = {"args": vars(args), "rows": rows, "environment": environment()}
    path = write_results(result, "host_pages", args.out_dir)
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
