"""Which attention kernel fails at the reference precompute's largest pass (issue #11), and at which edge.

The seed YAML's precompute on the H200 box made one pass of 32 sequences x 2,048 tokens (16 pairs, right-padded):
65,536 tokens (2^16: one past CUDA's 65,535 grid limit in y/z) and 32 x 16 heads x 2,048^2 = 2^31 attention scores
(one past int32). Its pairs were the only ones whose training step went NaN. This script runs V2-Lite's attention
(16 heads, MLA head dims q/k 192, v 128, bf16) on random q/k/v with a right-padding causal mask at shapes that cross
one edge, both or neither, under each SDPA backend, and compares every output with the same rows run as two halves
(below both edges): `non-finite` counts real (non-padding) query rows with a NaN/inf, `max |diff|` is over real rows.
`kernels` names the CUDA kernels the default dispatch ran (torch profiler).

    PYTHONPATH=src python benchmarks/sdpa_edges.py            # needs CUDA; ~1 min on an H200

Prints one table and writes results/sdpa_edges_<date>.json (and $OUT/ when set).
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, format_table, log, write_results  # noqa: E402

HEADS, QK_DIM, V_DIM = 16, 192, 128
# (sequences, padded length): which edge each shape crosses
SHAPES: tuple[tuple[int, int, str], ...] = (
    (8, 2048, "training pass (control)"),
    (30, 2048, "neither edge"),
    (32, 2048, "both: 2^16 tokens, 2^31 scores (the failing pass)"),
    (64, 1024, "2^16 tokens only"),
    (17, 2816, "2^31 scores only"),
)
BACKENDS: dict[str, Any] = {
    "default": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "math": SDPBackend.MATH,
}
COLUMNS = (
    ("shape", "sequences x T", "{}"),
    ("edge", "edge", "{}"),
    ("backend", "backend", "{}"),
    ("non_finite_rows", "non-finite rows", "{}"),
    ("max_abs_diff", "max |diff| vs halves", "{:.3g}"),
    ("note", "note", "{}"),
)


def inputs(sequences: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q [B, H, T, 192], k, v [B, H, T, 128] bf16 and the bool mask [B, 1, T, T] transformers builds for right
    padding (causal, keys past each row's length masked); the first row is full, the others 3/4 to full length."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(sequences, HEADS, length, QK_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(sequences, HEADS, length, QK_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(sequences, HEADS, length, V_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    lengths = torch.randint(3 * length // 4, length + 1, (sequences,), device="cuda", generator=g)
    lengths[0] = length
    pos = torch.arange(length, device="cuda")
    causal = pos[None, :] <= pos[:, None]  # [T, T] key <= query
    mask = causal[None, None] & (pos[None, None, None, :] < lengths[:, None, None, None])  # [B, 1, T, T]
    return q, k, v, mask, lengths


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, backend: Any) -> torch.Tensor:
    with sdpa_kernel(backend) if backend is not None else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def real_rows(out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`[B, H, T, D]` -> the rows at real (non-padding) query positions, `[N, H * D]`."""
    keep = torch.arange(out.shape[2], device=out.device)[None, :] < lengths[:, None]  # [B, T]
    return out.transpose(1, 2)[keep].flatten(1)


def default_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> str:
    """Names of the CUDA kernels the default SDPA dispatch launches for these inputs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        attend(q, k, v, mask, None)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if "attention" in e.key.lower() or "fmha" in e.key.lower()
             or "sdpa" in e.key.lower() or "flash" in e.key.lower() or "cudnn" in e.key.lower()}
    return "; ".join(sorted(names))[:300] or "(none matched)"


def check(sequences: int, length: int, edge: str, backend_name: str, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {"shape": f"{sequences} x {length}", "edge": edge, "backend": backend_name,
                           "tokens": sequences * length, "scores": sequences * HEADS * length * length}
    q, k, v, mask, lengths = inputs(sequences, length, seed)
    backend = BACKENDS[backend_name]
    try:
        whole = attend(q, k, v, mask, backend)
        half = sequences // 2
        halves = torch.cat([attend(q[:half], k[:half], v[:half], mask[:half], backend),
                            attend(q[half:], k[half:], v[half:], mask[half:], backend)])
        torch.cuda.synchronize()
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # backend does not take these inputs, or no memory
        row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return row
    got, want = real_rows(whole, lengths), real_rows(halves, lengths)
    row["non_finite_rows"] = int((~torch.isfinite(got)).any(-1).sum())
    both = torch.isfinite(got) & torch.isfinite(want)
    row["max_abs_diff"] = float((got.float() - want.float()).abs()[both].max()) if both.any() else None
    if backend_name == "default":
        row["note"] = default_kernels(q, k, v, mask)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {'|'.join(BACKENDS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sdpa_edges.py needs CUDA", file=sys.stderr)
        return 2
    rows = []
    for sequences, length, edge in SHAPES:
        for name in args.backends.split(","):
            log(f"{sequences} x {length} ({edge}), {name}")
            rows.append(check(sequences, length, edge, name, args.seed))
            torch.cuda.empty_cache()
    print(format_table(rows, COLUMNS))
    path = write_results({"env": environment(), "rows": rows}, "sdpa_edges", args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
