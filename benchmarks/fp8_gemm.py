"""Should streamed fp8 experts use fp8 GEMMs? One MoE layer's forward GEMMs, dequantize + bf16 grouped GEMM (what the
engine does) against torch's fp8 grouped GEMM (`torch._scaled_grouped_mm`, row-wise scales, sm90+), time and error.

    PYTHONPATH=src python benchmarks/fp8_gemm.py --model v2lite --tokens 16384

The engine holds fp8 experts in 128x128 blocks and dequantizes them into the bf16 slot (docs/design.md). An fp8 GEMM
would need per-output-channel weight scales (the fp8 values re-scaled per row once, at load) and the activations
quantized per row at every pass (a second rounding, of x), and only the forward could use it: the backward multiplies
by W^T, whose row-wise scales are per input channel. This probe measures what the forward would gain and lose on one
layer: for each variant the time of `gate_up` and `down` over `--tokens` routed rows, and the norm-relative error of
the layer's `gate_up` output against bf16 weights. A second table times the dequantization alone, fp8, int8 and int4, in
torch's ops and in the engine's Triton kernel (`kllama.experts.gpu_dequant`). Every failure is recorded, never
raised. Prints the tables, writes JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, format_table, log, model_config, write_results  # noqa: E402
from kllama.experts.quant import FP8_MAX, dequantize, quantize  # noqa: E402
from kllama.experts.routed import grouped_linear, route  # noqa: E402

COLUMNS = (("name", "variant", "{}"), ("ms", "ms (gate_up + down)", "{:.2f}"), ("rel_err", "gate_up rel err", "{:.2e}"),
           ("note", "note", "{}"))

DEQUANT_COLUMNS = (("scheme", "scheme", "{}"), ("form", "dequantize form", "{}"),
                   ("ms", "ms (gate_up + down)", "{:.3f}"), ("gb_s", "GB/s (read + written)", "{:.0f}"), ("note", "note", "{}"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("v2lite", "qwen3-30b", "qwen3-235b"), default="v2lite")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the pass (x top_k routed rows)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    return p.parse_args(argv)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median milliseconds of `fn` on the GPU (after a warm-up) and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], out


def rowwise_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight [E, N, K]` -> fp8 values `[E, N, K]` and fp32 per-row scales `[E, N]` (what a row-wise GEMM takes)."""
    scale = weight.float().abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    return (weight.float() / scale[..., None]).to(torch.float8_e4m3fn), scale


def dequantize_only(gate_up: torch.Tensor, down: torch.Tensor, slots: list[torch.Tensor], repeats: int,
                    ) -> list[dict[str, Any]]:
    """One layer's dequantization into the bf16 slots, per scheme: torch's ops against the Triton kernel (what a
    streamed quantized layer pays on every pass), with the memory traffic it implies."""
    rows: list[dict[str, Any]] = []
    for scheme in ("fp8", "int8", "int4"):
        weights = [quantize(gate_up, scheme, projections=2), quantize(down, scheme)]
        moved = sum(w.nbytes + s.numel() * s.element_size() for w, s in zip(weights, slots))
        for form, kernel in (("torch ops", False), ("Triton kernel", True)):
            try:
                ms, _ = timed(lambda: [dequantize(w, out=s, kernel=kernel) for w, s in zip(weights, slots)], repeats)
                rows.append({"scheme": scheme, "form": form, "ms": ms, "gb_s": moved / ms / 1e6, "note": ""})
            except Exception as exc:  # noqa: BLE001 - record, never raise (the GPU call must finish)
                rows.append({"scheme": scheme, "form": form, "note": f"failed: {type(exc).__name__}: {exc}"[:200]})
            log(f"{rows[-1]}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_gemm.py needs a CUDA GPU")
    device = torch.device("cuda")
    config = model_config(args.model, tiny=False, layers=1)
    experts = getattr(config, "n_routed_experts", None) or config.num_experts
    hidden, inter, top_k = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    gen = torch.Generator(device=device).manual_seed(0)
    gate_up = (torch.randn(experts, 2 * inter, hidden, device=device, generator=gen) * 0.02).bfloat16()
    down = (torch.randn(experts, hidden, inter, device=device, generator=gen) * 0.02).bfloat16()
    x = torch.randn(args.tokens, hidden, device=device, generator=gen).bfloat16()
    index = torch.rand(args.tokens, experts, device=device, generator=gen).topk(top_k, dim=-1).indices
    routing = route(index, experts)
    xs = x[routing.tokens]  # [S, H] rows sorted by expert
    act = torch.randn(xs.shape[0], inter, device=device, generator=gen).bfloat16()
    reference = grouped_linear(xs.float(), gate_up.float(), routing)  # fp32 weights: the error's yardstick
    rows: list[dict[str, Any]] = []

    def add(name: str, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]], note: str) -> None:
        try:
            ms, (hidden_out, _) = timed(fn, args.repeats)
            err = ((hidden_out.float() - reference).norm() / reference.norm()).item()
            rows.append({"name": name, "ms": ms, "rel_err": err, "note": note})
        except Exception as exc:  # noqa: BLE001 - record, never raise (the GPU call must finish)
            rows.append({"name": name, "note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
        log(f"{rows[-1]}")

    add("bf16 weights", lambda: (grouped_linear(xs, gate_up, routing), grouped_linear(act, down, routing)),
        "no quantization (the copy costs twice the bytes)")
    blocks = [quantize(gate_up, "fp8", projections=2), quantize(down, "fp8")]
    slots = [torch.empty_like(gate_up), torch.empty_like(down)]

    def engine_path() -> tuple[torch.Tensor, torch.Tensor]:
        w1, w2 = (dequantize(q, out=s) for q, s in zip(blocks, slots))
        return grouped_linear(xs, w1, routing), grouped_linear(act, w2, routing)

    add("fp8 blocks, dequantize + bf16 grouped GEMM", engine_path, "what the engine does (dequantization included)")
    dequant_rows = dequantize_only(gate_up, down, slots, args.repeats)
    scaled = getattr(torch, "_scaled_grouped_mm", None)
    if scaled is None:
        rows.append({"name": "fp8 row-wise, torch._scaled_grouped_mm", "note": "not in this torch"})
    else:
        w1, s1 = rowwise_fp8(dequantize(blocks[0]))
        w2, s2 = rowwise_fp8(dequantize(blocks[1]))

        def fp8_path() -> tuple[torch.Tensor, torch.Tensor]:
            outs = []
            for rows_in, weight, w_scale in ((xs, w1, s1), (act, w2, s2)):
                x_scale = rows_in.float().abs().amax(-1).clamp_min(1e-12) / FP8_MAX  # [S] per-row, dynamic
                x8 = (rows_in.float() / x_scale[:, None]).to(torch.float8_e4m3fn)
                outs.append(scaled(x8, weight.transpose(-2, -1), x_scale, w_scale, offs=routing.offsets,
                                   out_dtype=torch.bfloat16))
            return outs[0], outs[1]

        add("fp8 row-wise, torch._scaled_grouped_mm", fp8_path,
            "x quantized per row each pass (included); forward only: the backward needs W^T")
    results = {"benchmark": "fp8_gemm", "model": args.model, "tokens": args.tokens, "routed_rows": int(xs.shape[0]),
               "shape": {"experts": experts, "hidden": hidden, "inter": inter, "top_k": top_k},
               "environment": environment(), "rows": rows, "dequantize_only": dequant_rows}
    print(format_table(rows, COLUMNS), flush=True)
    print(format_table(dequant_rows, DEQUANT_COLUMNS), flush=True)
    path = write_results(results, f"fp8_gemm_{args.model}", args.out_dir)
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
