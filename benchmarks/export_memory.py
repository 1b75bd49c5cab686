"""Host memory of `kllama export`: the streamed merge (the default) against the in-memory merge (PEFT's
`merge_and_unload` + `save_pretrained`, what `kllama export` falls back to), on a layer-limited model of full width.

    PYTHONPATH=src python benchmarks/export_memory.py --model v2lite --layers 6 --work /tmp/kllama_export

Builds once, under `--work`: a hub-layout checkpoint with the real config's widths and `--layers` decoder layers
(random bf16 weights, `kllama.model.tiny.write_tiny_model`), and a PEFT adapter of rank `--rank` on every linear
layer and the routed experts (`target_parameters`, lora_B random so the merge changes every adapted weight). Then
it exports twice, each in its own process sampled by `user_path.TreeMemory` (PSS, shared pages counted once):
`kllama export` as a user runs it, and the in-memory merge forced (the streamed planner made to refuse, as for an
adapter it cannot stream). The two exports must agree: the streamed one's tensors are compared with the in-memory
one's (same names, bf16 values within one rounding step where PEFT rounds its delta first). Prints one table and
writes `results/export_memory_<model>_<date>.json` (a copy under `$OUT`). CPU only: export does not use a GPU.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FULL_SHAPES, environment, format_table, log, write_results  # noqa: E402
from user_path import TreeMemory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"v2lite": "deepseek", "qwen3-30b": "qwen3"}
COLUMNS = (("mode", "export", "{}"), ("wall_s", "wall s", "{:.1f}"), ("peak_host_gb", "peak host GB (PSS)", "{:.2f}"),
           ("x_checkpoint", "x checkpoint", "{:.2f}"), ("exit_code", "exit", "{}"), ("note", "note", "{}"))

# the in-memory merge, forced: the streamed planner refuses as it does for an adapter it cannot stream
IN_MEMORY = ("import sys, kllama.infer.export as export; from kllama.infer.adapter_deltas import CannotStream\n"
             "def refuse(*a, **k): raise CannotStream('forced by benchmarks/export_memory.py')\n"
             "export.plan_merge = refuse\n"
             "from kllama.cli import main; sys.exit(main(['export', *sys.argv[1:]]))")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(TEMPLATES), default="v2lite")
    p.add_argument("--layers", type=int, default=6, help="decoder layers (the first is dense for V2-Lite)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("/tmp/kllama_export"))
    p.add_argument("--modes", default="streamed,in-memory", help="comma list of streamed|in-memory")
    p.add_argument("--tiny", action="store_true", help="the family's tiny shapes (a smoke test)")
    p.add_argument("--out-dir", type=Path, default=None)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Path, Path]:
    """The checkpoint and the adapter, written once and reused while their directories are complete."""
    import torch

    from kllama.model.tiny import write_random_adapter, write_tiny_model

    size = "tiny" if args.tiny else f"{args.layers}l"
    model, adapter = args.work / f"model_{args.model}_{size}", args.work / f"adapter_{size}_r{args.rank}"
    if not (model / ".complete").exists():
        shutil.rmtree(model, ignore_errors=True)
        arch, fields = FULL_SHAPES[args.model]
        fields = {} if args.tiny else {**fields, "num_hidden_layers": args.layers}
        write_tiny_model(model, arch, dtype=torch.bfloat16, **fields)
        (model / ".complete").write_text("ok\n")
        shutil.rmtree(adapter, ignore_errors=True)
    if not (adapter / ".complete").exists():
        from peft import LoraConfig

        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        write_random_adapter(model, adapter, config, std=0.01, dtype=torch.bfloat16)
        (adapter / ".complete").write_text("ok\n")
    return model, adapter


def export(mode: str, model: Path, adapter: Path, out: Path, template: str) -> dict[str, Any]:
    """One export in its own process, its peak memory sampled; the output directory is kept for the comparison."""
    shutil.rmtree(out, ignore_errors=True)
    keys = [f"model_name_or_path={model}", f"adapter_name_or_path={adapter}", f"export_dir={out}",
            f"template={template}"]
    cmd = [sys.executable, "-m", "kllama.cli", "export", *keys] if mode == "streamed" else \
        [sys.executable, "-c", IN_MEMORY, *keys]
    log(f"{mode} export of {model.name} + {adapter.name}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(proc.pid)
    output, _ = proc.communicate()
    result = {"mode": mode, "exit_code": proc.returncode, "wall_s": time.perf_counter() - start, **memory.stop()}
    if proc.returncode:
        result["note"] = output.strip().splitlines()[-1][:120] if output.strip() else "failed"
    return result


def compare(streamed: Path, in_memory: Path) -> str:
    """Whether the two exports hold the same tensor names, and how far apart their values are: the largest
    per-tensor `||a - b|| / ||b||` (the in-memory merge rounds PEFT's delta to bf16 before adding it, the streamed
    one adds in fp32 and rounds once, so bf16 tensors differ by about one rounding step where a delta was added)."""
    from kllama.model.checkpoint import iter_tensors, scan_checkpoint

    a, b = scan_checkpoint(streamed), scan_checkpoint(in_memory)
    if set(a.tensors) != set(b.tensors):
        return f"names differ: {len(set(a.tensors) ^ set(b.tensors))} keys"
    worst, where = 0.0, ""
    for (name, x), (_, y) in zip(iter_tensors(a, sorted(a.tensors)), iter_tensors(b, sorted(a.tensors))):
        if x.is_floating_point():
            rel = ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()
            worst, where = max((worst, where), (rel, name))
    return f"same {len(a.tensors)} names; largest relative difference {worst:.1e} ({where})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, adapter = build(args)
    log(f"model and adapter ready in {time.perf_counter() - start:.0f} s")
    checkpoint_gb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
    rows, outs = [], {}
    for mode in args.modes.split(","):
        outs[mode] = args.work / f"export_{mode}"
        row = export(mode, model, adapter, outs[mode], TEMPLATES[args.model])
        row["x_checkpoint"] = row["peak_host_gb"] / checkpoint_gb
        rows.append(row)
    if len(outs) == 2 and all(r["exit_code"] == 0 for r in rows):
        rows[0]["note"] = compare(outs["streamed"], outs["in-memory"])
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    print(format_table(rows, COLUMNS))
    result = {"model": args.model, "tiny": args.tiny, "layers": None if args.tiny else args.layers, "rank": args.rank, "checkpoint_gb": checkpoint_gb,
              "rows": rows, "environment": environment()}
    write_results(result, f"export_memory_{args.model}_{'tiny' if args.tiny else f'{args.layers}l'}", args.out_dir)
    return result


if __name__ == "__main__":
    main()
