"""The placement table printed at start-up: where each MoE layer's routed experts run and what memory they hold."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kllama.experts.crossover import NEVER
from kllama.experts.placement import ExpertPlacement

_HEADERS = ("layer", "mode", "short/long", "crossover", "host", "GPU resident", "source")


def format_bytes(n: int) -> str:
    """`n` bytes as a short human string (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _crossover(p: ExpertPlacement) -> str:
    if p.short == p.long:
        return "-"
    if p.crossover_tokens is None:
        return "measure"
    infer, train = _tokens(p.crossover(training=False)), _tokens(p.crossover_tokens)
    if infer == train:
        return infer
    return f"infer {infer} / train {train}"


def _tokens(crossover: int) -> str:
    """A crossover as the table shows it; NEVER (the short target at any size) reads "never"."""
    return "never" if crossover >= NEVER else f"{crossover} tok"


def _resident_bytes(module: Any, p: ExpertPlacement, host: int) -> int:
    # A `gpu` target keeps a full copy on the GPU once first used; count it up front so the table shows the plan.
    held = int(module.gpu_bytes()) if hasattr(module, "gpu_bytes") else 0
    dense = int(module.dense_bytes()) if hasattr(module, "dense_bytes") else host  # quantized: resident is dense
    return max(held, dense) if "gpu" in (p.short, p.long) else held


def placement_table(engine_or_modules: Any, placements: Mapping[str, ExpertPlacement] | None = None,
                    notes: Sequence[str] = ()) -> str:
    """A text table with one row per MoE layer and a totals row.

    `engine_or_modules` is an `ExpertEngine` (its `.modules`) or a mapping of qualified name -> HostExperts-like
    module (`host_bytes()`, `gpu_bytes()`, `.placement`). `placements` overrides the modules' own placements
    (e.g. to print the plan before the modules exist); columns: name, mode, short/long target, crossover, host
    bytes, GPU-resident bytes (what a `gpu` target will keep), and the rule that decided it. `notes` (what a rule
    file's translation did: kernels run as bf16, entries left to stock modules, ...) follow the table.
    """
    modules: Mapping[str, Any] = getattr(engine_or_modules, "modules", engine_or_modules)
    rows: list[tuple[str, ...]] = []
    total_host = total_gpu = 0
    for name, module in modules.items():
        p = (placements or {}).get(name) or module.placement
        host = int(module.host_bytes())
        gpu = _resident_bytes(module, p, host)
        total_host += host
        total_gpu += gpu
        rows.append((name, p.mode, f"{p.short}/{p.long}", _crossover(p), format_bytes(host), format_bytes(gpu),
                     p.source))
    streamer = getattr(engine_or_modules, "streamer", None)
    slots = int(streamer.gpu_bytes()) if streamer is not None and hasattr(streamer, "gpu_bytes") else 0
    held = sorted({getattr(m, "expert_dtype", "") for m in modules.values()} - {"", "bfloat16", "float32", "float16"})
    total_label = (f"total ({len(rows)} MoE layers)" + (f", experts held {'/'.join(held)}" if held else "")
                   + (f", + {format_bytes(slots)} stream slots" if slots else ""))
    rows.append((total_label, "", "", "", format_bytes(total_host), format_bytes(total_gpu + slots), ""))
    widths = [max(len(r[i]) for r in [_HEADERS, *rows]) for i in range(len(_HEADERS))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    listed = ["rule file notes:", *(f"  - {n}" for n in notes)] if notes else []
    return "\n".join([line(_HEADERS), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1]), *listed])


def rule_training_note(engine: Any, tokens: int) -> str | None:
    """One line for layers whose rule asked for CPU training (`asked_long`): both expert-time estimates of a
    training pass over `tokens` tokens from the start-up measurement, and where the passes run. None when no rule
    asked, or nothing was measured (no CUDA device: the CPU is all there is)."""
    asked = [name for name, m in engine.modules.items() if m.placement.asked_long == "cpu"]
    measured = [engine.measurements[name] for name in asked if name in engine.measurements]
    if not measured:
        return None
    cpu_s = sum(c.cpu_seconds("training", tokens) for c in measured)
    stream_s = sum(c.stream_seconds("training") for c in measured)
    cpu_rate, stream_rate = tokens / max(cpu_s, 1e-9), tokens / max(stream_s, 1e-9)
    streamed = sum(engine.modules[name].placement.target_for(tokens, training=True) == "stream" for name in asked)
    head = (f"rule asks for CPU expert training in {len(asked)} layers (est. {cpu_rate:,.0f} tok/s here, experts "
            f"only, {tokens:,}-token passes)")
    if streamed:
        where = f"streaming them to the GPU instead (est. {stream_rate:,.0f} tok/s)"
    else:
        where = f"kept on the CPU, measured faster here (streaming est. {stream_rate:,.0f} tok/s)"
    return f"{head}; {where}; expert_placement: cpu forces the CPU"
