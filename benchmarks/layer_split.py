"""What a step spends per decoder layer and what it spends once (benchmarks/packed_pass.py --layers 4,8; issues 11, 16).

The same step (same pairs, same mode) runs on models of two or more layer counts. For every op, its self time in one
profiled step (self CUDA time on a GPU: the kernels it launched itself; self CPU time on the CPU) is a point per
count; a least-squares line through (layers, ms) gives per layer = the slope and fixed = the intercept (the
102,400-vocab log-prob head, embeddings, loss, plus layer 0's dense MLP less one MoE layer: the counts all include
layer 0), and the projected full-depth cost `fixed + per_layer * full_layers`. The step's seconds get the same split.
Ops are also summed into a few classes by name (`OP_CLASSES`, first match wins), so an op used by two parts of the
model (a `mul` in a norm and in the router) lands in one class.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

import torch

from common import format_table

# class of an op (or device transfer) by its profiler name; first match wins, the rest is `other`
OP_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("host->device copies", re.compile(r"Memcpy HtoD")),
    ("attention bwd", re.compile(r"(attention|flash|fmha|sdpa).*backward", re.IGNORECASE)),
    ("attention fwd", re.compile(r"attention|flash|fmha|sdpa", re.IGNORECASE)),
    ("GEMM", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_grouped_mm|_scaled_mm|_scaled_grouped_mm)$"
                        r"|gemm", re.IGNORECASE)),
    ("norms", re.compile(r"norm|^aten::(rsqrt|pow|mean)$", re.IGNORECASE)),
    ("elementwise", re.compile(r"^aten::(mul|add|sub|div|neg|exp|log|copy|_to_copy|to|clone|fill|zero|silu|sigmoid"
                               r"|where|clamp|masked_fill)_?$")),
)
OTHER = "other"
OUTSIDE_OPS = "(kernels outside any op)"  # device time no PyTorch op launched (e.g. a Triton kernel called bare)
TRANSFER_PREFIXES = ("Memcpy", "Memset")  # device transfers: own rows, not their op's (`aten::copy_` also casts)
SHOWN_OPS = 25  # ops printed per mode, by per-layer cost (the JSON has every op)


def op_class(name: str) -> str:
    """The class of profiler op `name` (`OP_CLASSES`), or `other`."""
    return next((label for label, pattern in OP_CLASSES if pattern.search(name)), OTHER)


# ----------------------------------------------------------------------------- one profiled step
def op_depth(event: Any) -> int:
    """How many host ops enclose profiler event `event` (torch links them through `cpu_parent`)."""
    depth, parent = 0, getattr(event, "cpu_parent", None)
    while parent is not None:
        depth, parent = depth + 1, getattr(parent, "cpu_parent", None)
    return depth


def op_times(events: list[Any], device: torch.device) -> list[dict[str, Any]]:
    """Every op of one profiled step (`prof.events()`) with its self time in ms and its calls, largest first.

    CUDA: each kernel counts for the PyTorch op that launched it; memcpy/memset transfers are rows of their own
    (`Memcpy HtoD (Pinned -> Device)`: the streamed experts' weights, on a side stream), and device time no op
    launched is `OUTSIDE_OPS`. The rows sum to the step's device time summed over streams (which may exceed the
    wall time where the copy stream overlaps compute). CPU: each op's self CPU time (the rows sum to the step's
    CPU time on the profiled threads)."""
    table: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if device.type != "cuda":
        for event in events:
            if event.device_type == torch.autograd.DeviceType.CPU and not event.is_async:
                entry = table[event.name]
                entry[0] += event.self_cpu_time_total / 1e3
                entry[1] += 1
    else:
        device_us = attributed_us = 0.0
        # each device record counts once: a kernel listed under several host ops (nested ops, or an op and the
        # runtime call that launched it) goes to the innermost (latest-starting) PyTorch op that lists it, a CUDA
        # runtime call (`cudaLaunchKernel`, `cudaMemcpyAsync`, ...) only when no op does
        unclaimed: Counter[tuple[str, float]] = Counter()
        for event in events:
            if event.device_type == torch.autograd.DeviceType.CPU or getattr(event, "is_user_annotation", False):
                continue  # a host op, or a GPU-side range rather than a kernel
            elapsed = event.time_range.elapsed_us()
            device_us += elapsed
            if event.name.startswith(TRANSFER_PREFIXES):  # a row of its own, from the device's record
                entry = table[event.name]
                entry[0] += elapsed / 1e3
                entry[1] += 1
                attributed_us += elapsed
            else:
                unclaimed[(event.name, round(elapsed, 3))] += 1
        host_ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.kernels]
        # innermost first: deepest in the op tree (a child can start in its parent's microsecond), then latest
        for event in sorted(host_ops, key=lambda e: (e.name.startswith("cuda"), -op_depth(e), -e.time_range.start)):
            own = False
            for kernel in event.kernels:
                key = (kernel.name, round(kernel.duration, 3))
                if kernel.name.startswith(TRANSFER_PREFIXES) or unclaimed[key] <= 0:
                    continue
                unclaimed[key] -= 1
                table[event.name][0] += kernel.duration / 1e3
                own = True
                attributed_us += kernel.duration
            if own:
                table[event.name][1] += 1
        if device_us - attributed_us > 1.0:
            table[OUTSIDE_OPS] = [(device_us - attributed_us) / 1e3, 0]
    rows = [{"name": name, "ms": ms, "calls": int(calls)} for name, (ms, calls) in table.items() if ms > 0]
    return sorted(rows, key=lambda row: row["ms"], reverse=True)


# ----------------------------------------------------------------------------- the fit
def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line through (xs, ys): (slope, intercept). Needs two distinct xs."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    return slope, mean_y - slope * mean_x


def split_entry(name: str, counts: list[int], measured: list[float], full_layers: int, kind: str | None = None,
                ) -> dict[str, Any]:
    """One line of the split: `measured` ms at each layer count, its per-layer slope, fixed intercept, the
    projection at `full_layers` and the largest distance of a measured point from the line (0 for two counts);
    `kind` is its class (default: the op class of `name`)."""
    per_layer, fixed = line_fit([float(n) for n in counts], measured)
    residual = max(abs(fixed + per_layer * n - y) for n, y in zip(counts, measured))
    return {"name": name, "class": op_class(name) if kind is None else kind, "measured_ms": measured, "per_layer_ms": per_layer,
            "fixed_ms": fixed, "projected_ms": fixed + per_layer * full_layers, "max_residual_ms": residual}


def split_for(rows: list[dict[str, Any]], full_layers: int) -> dict[str, Any] | None:
    """The per-layer / fixed split of one mode's rows (one per layer count, same placement), or None when fewer
    than two counts measured it. The step line uses every count with a step time; ops and classes the counts
    that were profiled (an op absent at a count took 0 ms there)."""
    timed = sorted((r for r in rows if r.get("s_per_step") is not None), key=lambda r: r["layers"])
    if len({r["layers"] for r in timed}) < 2:
        return None
    first = timed[0]
    counts = [r["layers"] for r in timed]
    split: dict[str, Any] = {
        "name": first["name"], "placement": first["placement"], "layers": counts, "full_layers": full_layers,
        "step": split_entry("step (wall, s/step median)", counts, [1e3 * r["s_per_step"] for r in timed],
                            full_layers, "-"),
        "ops": [], "classes": [], "profiled_layers": [],
    }
    profiled = [r for r in timed if r.get("profile", {}).get("ops")]
    if len({r["layers"] for r in profiled}) < 2:
        return split
    counts = [r["layers"] for r in profiled]
    per_count = [{op["name"]: op["ms"] for op in r["profile"]["ops"]} for r in profiled]
    names = sorted({name for ops in per_count for name in ops})
    ops = [split_entry(name, counts, [ops.get(name, 0.0) for ops in per_count], full_layers) for name in names]
    split["ops"] = sorted(ops, key=lambda op: op["per_layer_ms"], reverse=True)
    by_class: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(counts))
    for op in ops:
        by_class[op["class"]] = [a + b for a, b in zip(by_class[op["class"]], op["measured_ms"])]
    classes = [split_entry(label, counts, measured, full_layers, label) for label, measured in by_class.items()]
    split["classes"] = sorted(classes, key=lambda c: c["per_layer_ms"], reverse=True)
    split["total"] = split_entry("all ops (profiled step)", counts,
                                 [sum(ops.values()) for ops in per_count], full_layers, "-")
    split["profiled_layers"] = counts
    return split


def layer_splits(rows: list[dict[str, Any]], full_layers: int) -> list[dict[str, Any]]:
    """The split of every (mode, placement) measured at two or more layer counts, in the rows' order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if "layers" in row:
            groups.setdefault((row["name"], row["placement"]), []).append(row)
    return [split for group in groups.values() if (split := split_for(group, full_layers)) is not None]


# ----------------------------------------------------------------------------- printing
def _columns(counts: list[int], full_layers: int, first: str = "op", with_class: bool = True,
             ) -> tuple[tuple[str, str, str], ...]:
    measured = tuple((f"at_{n}", f"{n} layers", "{:.1f}") for n in counts)
    named = (("name", first, "{}"),) + ((("class", "class", "{}"),) if with_class else ())
    return (*named, *measured, ("per_layer_ms", "per layer", "{:.2f}"),
            ("fixed_ms", "fixed", "{:.1f}"), ("projected_ms", f"@{full_layers}", "{:.1f}"),
            ("max_residual_ms", "fit resid", "{:.1f}"))


def _cells(entry: dict[str, Any], counts: list[int]) -> dict[str, Any]:
    cells = dict(entry)
    cells.update({f"at_{n}": ms for n, ms in zip(counts, entry["measured_ms"])})
    cells["name"] = entry["name"] if len(entry["name"]) <= 60 else entry["name"][:57] + "..."
    return cells


def format_split(split: dict[str, Any], metric: str) -> str:
    """One mode's split as text: the step's wall time, then classes and the top ops by per-layer `metric` ms."""
    full = split["full_layers"]
    lines = [f"== {split['name']} [{split['placement']}]: per layer / fixed, layers "
             f"{', '.join(map(str, split['layers']))} -> projected at {full} (ms) =="]
    lines.append(format_table([_cells(split["step"], split["layers"])],
                              _columns(split["layers"], full, "", with_class=False)))
    if split["ops"]:
        counts = split["profiled_layers"]
        lines.append(f"-- by class ({metric}, one profiled step) --")
        lines.append(format_table([_cells(c, counts) for c in [*split["classes"], split["total"]]],
                                  _columns(counts, full, "class", with_class=False)))
        lines.append(f"-- top {min(SHOWN_OPS, len(split['ops']))} of {len(split['ops'])} ops by per-layer {metric} --")
        lines.append(format_table([_cells(op, counts) for op in split["ops"][:SHOWN_OPS]], _columns(counts, full)))
    return "\n".join(lines)
