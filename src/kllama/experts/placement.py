"""Where one MoE layer's routed experts run, as plain data shared by rules, engine and reports.

A placement names two targets: one for short inputs (decode, small batches) and one for long inputs (training
micro-steps, long prefills), and the token count that separates them. The three targets mirror the physics in
DESIGN.md: `cpu` computes next to the weights in host RAM, `stream` copies the weights to the GPU for the pass,
`gpu` keeps them resident. The user-facing modes are shorthands:

* `cpu`    -> short=cpu,    long=cpu
* `stream` -> short=stream, long=stream
* `gpu`    -> short=gpu,    long=gpu
* `auto`   -> short=cpu,    long=stream, crossover measured at start-up (and layers promoted to `gpu` while the
  `max_gpu_memory` budget allows).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Target = Literal["cpu", "stream", "gpu"]
Mode = Literal["cpu", "stream", "gpu", "auto"]

TARGETS: tuple[str, ...] = ("cpu", "stream", "gpu")
MODES: tuple[str, ...] = ("cpu", "stream", "gpu", "auto")

_MODE_TARGETS: dict[str, tuple[str, str]] = {
    "cpu": ("cpu", "cpu"),
    "stream": ("stream", "stream"),
    "gpu": ("gpu", "gpu"),
    "auto": ("cpu", "stream"),
}


@dataclass(frozen=True)
class ExpertPlacement:
    """Placement of one MoE layer's routed experts.

    `short` runs passes with fewer than `crossover_tokens` tokens, `long` the rest. `crossover_tokens=None` means
    "measure it at start-up" (only meaningful when short != long). `cpu_threads` and `chunk_size` tune the CPU path
    (KTransformers' `cpu_infer` / `chunk_size`).
    """

    short: Target = "cpu"
    long: Target = "stream"
    crossover_tokens: int | None = None
    cpu_threads: int | None = None
    chunk_size: int = 8192
    source: str = "default"  # which rule or option decided this, for the placement table

    @classmethod
    def from_mode(cls, mode: str, **kwargs: object) -> "ExpertPlacement":
        """Build a placement from a user-facing mode name (`cpu | stream | gpu | auto`)."""
        if mode not in _MODE_TARGETS:
            raise ValueError(f"unknown expert placement {mode!r}; choose one of {', '.join(MODES)}")
        short, long = _MODE_TARGETS[mode]
        return cls(short=short, long=long, **kwargs)  # type: ignore[arg-type]

    @property
    def mode(self) -> str:
        """The user-facing name of this placement (`auto` when short and long differ)."""
        if self.short == self.long:
            return self.short
        return "auto"

    def target_for(self, num_tokens: int) -> Target:
        """Which target runs a pass over `num_tokens` tokens."""
        if self.short == self.long:
            return self.short
        threshold = self.crossover_tokens if self.crossover_tokens is not None else 0
        return self.short if num_tokens < threshold else self.long

    def with_crossover(self, tokens: int) -> "ExpertPlacement":
        """A copy with a measured crossover token count."""
        return replace(self, crossover_tokens=tokens)
