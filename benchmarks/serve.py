"""Serving many users at once: the real `kllama api` server driven by the official openai client (async).

    PYTHONPATH=src python benchmarks/serve.py /path/to/model_dir --placements auto,gpu --concurrency 1,8,32

For each placement a `kllama api` subprocess serves the model directory on 127.0.0.1 (expert engine,
`expert_placement=<placement>`, plus any `--set key=value`; `auto` fills the GPU memory the KV cache leaves with
resident experts, as `kllama api` does by default: `--set gpu_memory_utilization=0` serves it with every layer's
experts in host RAM); after one warm-up request, each concurrency level runs
that many streaming requests of `--new` tokens at once (`ignore_eos`, greedy); then `--new-lengths` requests, one at
a time, each prompt longer than any the server has read (a TTFT row: what a per-shape cost does to a new prompt).
Per level: aggregate tokens/s (completion tokens of all streams / wall time), time to first token p50/p95 (to a
stream's first event: the server sends it with the first answer token, whose text may be empty), time per output
token p50/p95 (a stream's time after its first token / its other tokens), inter-token latency p50/p95 (gaps between
a stream's content chunks), and the server's own counters from /health: the largest batch it decoded in one step and
its mean batch over the level. A random full-size model picks mostly ids its small test tokenizer has no text for
(vocab 102,400 against 2,048), so its content chunks are sparse: read TTFT and time per token, not the inter-chunk
gaps, on such a model. Writes `results/serve_<model>_<date>.json` (and a copy under `$OUT`) and prints one table. On
a machine without CUDA every placement runs on the CPU (a smoke test with a tiny model).

The driver needs only `openai` (and httpx); the server process needs kllama's API extras (fastapi, uvicorn,
sse-starlette).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, format_table, log, placement_list, write_results  # noqa: E402

from kllama.train.launch import free_port  # noqa: E402

SERVE_COLUMNS = (
    ("name", "run", "{}"),
    ("aggregate_tok_s", "aggregate tok/s", "{:.1f}"),
    ("speedup", "x one stream", "{:.2f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p95_s", "TTFT p95 s", "{:.3f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p95_ms", "TPOT p95 ms", "{:.1f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("itl_p95_ms", "ITL p95 ms", "{:.1f}"),
    ("max_batch", "largest batch", "{}"),
    ("mean_batch", "mean batch", "{:.1f}"),
    ("note", "note", "{}"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="Hugging Face model directory to serve")
    p.add_argument("--placements", default="auto,gpu", help="comma list of cpu|gpu|stream|auto")
    p.add_argument("--concurrency", default="1,8,32", help="comma list of concurrent streams per level")
    p.add_argument("--new-lengths", type=int, default=4,
                   help="requests after the levels, one at a time, each prompt longer than any before (TTFT row)")
    p.add_argument("--new", type=int, default=128, help="tokens generated per stream")
    p.add_argument("--template", default="auto", help="chat template passed to kllama api")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra kllama api override (repeatable), e.g. cpu_infer=16")
    p.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for the server to load")
    p.add_argument("--out-dir", type=Path, default=None, help="JSON directory (default benchmarks/results)")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def start_server(args: argparse.Namespace, placement: str, max_batch: int, log_path: Path) -> tuple[subprocess.Popen,
                                                                                                      str, str]:
    """`kllama api` on a free loopback port; returns (process, base URL, API key) once /health answers."""
    import httpx

    port, key = free_port(), secrets.token_hex(8)
    overrides = [f"model_name_or_path={args.model_dir}", f"template={args.template}", "use_kt=true",
                 "infer_backend=ktransformers", f"expert_placement={placement}", *args.set]
    env = {**os.environ, "API_HOST": "127.0.0.1", "API_PORT": str(port), "API_KEY": key,
           "API_MAX_BATCH": str(max_batch), "API_MAX_QUEUE": str(max(256, max_batch))}
    with open(log_path, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "kllama.cli", "api", *overrides], stdout=sink,
                                stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kllama api exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base, key
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"kllama api not ready after {args.ready_timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


async def one_stream(client: Any, model: str, index: int, new_tokens: int, longer: int = 0) -> dict[str, Any]:
    """One streaming request (its prompt `longer` sentences longer than the levels' own): when its first event came,
    its content chunks' arrival times and the completion tokens the server reports."""
    start = time.perf_counter()
    first: float | None = None
    stamps: list[float] = []
    tokens = 0
    content = f"Request {index}: tell a long story about routed experts." + " Then tell it again." * longer
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}],
        max_tokens=new_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for event in stream:
        if event.choices and first is None:
            first = time.perf_counter()
        if event.choices and event.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if event.usage is not None:
            tokens = event.usage.completion_tokens
    end = time.perf_counter()
    return {"start": start, "first": first, "end": end, "stamps": stamps, "tokens": tokens}


@contextlib.asynccontextmanager
async def served_model(base: str, key: str) -> AsyncIterator[tuple[Any, str]]:
    """The official openai client on the server at `base` and the id of the model it serves; closed on exit."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=key, timeout=1800, max_retries=0)
    try:
        yield client, (await client.models.list()).data[0].id
    finally:
        await client.close()


async def run_level(base: str, key: str, streams: int, new_tokens: int) -> dict[str, Any]:
    """`streams` concurrent requests; the level's aggregate numbers and the server's batch counters."""
    import httpx

    async with served_model(base, key) as (client, model):
        before = httpx.get(f"{base}/health", timeout=30).json()
        start = time.perf_counter()
        results = await asyncio.gather(*[one_stream(client, model, i, new_tokens) for i in range(streams)])
        wall = time.perf_counter() - start
        after = httpx.get(f"{base}/health", timeout=30).json()
    ttft = [r["first"] - r["start"] for r in results if r["first"] is not None]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in results if r["first"] is not None and r["tokens"] > 1]
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(r["tokens"] for r in results)
    steps = after.get("steps", 0) - before.get("steps", 0)
    generated = after.get("generated_tokens", 0) - before.get("generated_tokens", 0)
    return {"streams": streams, "wall_s": wall, "completion_tokens": tokens, "aggregate_tok_s": tokens / wall,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "tpot_p50_ms": (percentile(tpot, 50) or 0) * 1e3, "tpot_p95_ms": (percentile(tpot, 95) or 0) * 1e3,
            "itl_p50_ms": (percentile(gaps, 50) or 0) * 1e3, "itl_p95_ms": (percentile(gaps, 95) or 0) * 1e3,
            "max_batch": after.get("max_batch"), "mean_batch": generated / steps if steps else None,
            "server_steps": steps, "graph_captures": after.get("graph_captures", 0) - before.get("graph_captures", 0),
            "capture_s": after.get("capture_s", 0) - before.get("capture_s", 0)}


async def run_new_lengths(base: str, key: str, count: int, new_tokens: int) -> dict[str, Any]:
    """`count` requests one after another, each prompt longer than any before: the time to first token of a prompt
    length the server has not read yet. A cost paid once per shape (such as an attention graph built per shape)
    shows here and not in `run_level`, whose prompts repeat."""
    async with served_model(base, key) as (client, model):
        results = [await one_stream(client, model, 0, new_tokens, longer=i + 1) for i in range(count)]
    ttft = [r["first"] - r["start"] for r in results if r["first"] is not None]
    return {"requests": count, "ttft_s": ttft, "ttft_p50_s": percentile(ttft, 50),
            "ttft_max_s": max(ttft, default=None)}


def run_placement(args: argparse.Namespace, placement: str, levels: list[int], log_dir: Path) -> list[dict[str, Any]]:
    """Serve with `placement` and run every level; a failure becomes a row with its note."""
    log_path = log_dir / f"serve_{placement}.log"
    start = time.perf_counter()
    try:
        proc, base, key = start_server(args, placement, max(levels), log_path)
    except RuntimeError as exc:
        return [{"name": f"{placement}", "placement": placement, "note": f"server failed: {str(exc)[:200]}"}]
    ready_s = time.perf_counter() - start
    log(f"{placement}: server ready in {ready_s:.1f}s")
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(run_level(base, key, 1, min(args.new, 8)))  # warm-up
        for streams in levels:
            row = asyncio.run(run_level(base, key, streams, args.new))
            row.update(name=f"{placement} x{streams}", placement=placement, server_ready_s=ready_s)
            single = next((r for r in rows if r["streams"] == 1), row if streams == 1 else None)
            if single is not None:
                row["speedup"] = row["aggregate_tok_s"] / single["aggregate_tok_s"]
            log(f"{row['name']}: {row['aggregate_tok_s']:.1f} tok/s, TTFT p95 {row['ttft_p95_s'] or 0:.3f}s, "
                f"largest batch {row['max_batch']}")
            rows.append(row)
        fresh = asyncio.run(run_new_lengths(base, key, args.new_lengths, min(args.new, 8)))
        rows.append({"name": f"{placement}, {args.new_lengths} new prompt lengths", "placement": placement,
                     "streams": 1, "ttft_p50_s": fresh["ttft_p50_s"], "ttft_p95_s": fresh["ttft_max_s"],
                     "ttft_s": fresh["ttft_s"], "note": "one at a time, each prompt longer than any before (p95: max)"})
        log(f"{placement}: TTFT at new prompt lengths {', '.join(f'{t:.3f}' for t in fresh['ttft_s'])} s")
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the next placement still runs
        rows.append({"name": f"{placement}", "placement": placement, "note": f"failed: {str(exc)[:200]}"})
    finally:
        stop_server(proc)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    placements = placement_list(args.placements)
    levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    config = json.loads((args.model_dir / "config.json").read_text())
    out_dir = args.out_dir
    log_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else (out_dir or Path("."))
    log_dir.mkdir(parents=True, exist_ok=True)
    log(f"serve {args.model_dir.name} ({config.get('model_type')}, {config.get('num_hidden_layers')} layers): "
        f"placements {placements}, streams {levels}, {args.new} tokens each")
    rows = [row for placement in placements for row in run_placement(args, placement, levels, log_dir)]
    results = {"benchmark": "serve", "model_dir": str(args.model_dir), "model_type": config.get("model_type"),
               "layers": config.get("num_hidden_layers"), "new_tokens": args.new, "levels": levels,
               "overrides": args.set, "environment": environment(), "rows": rows}
    print(format_table(rows, SERVE_COLUMNS), flush=True)
    path = write_results(results, f"serve_{args.model_dir.name}", out_dir)
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
