"""Where one MoE layer's routed experts run, as plain data shared by rules, engine and reports.

A placement names two targets: one for short inputs (decode, small batches) and one for long inputs (training
micro-steps, long prefills), and the token count that separates them. The three targets mirror the physics in
docs/design.md: `cpu` computes next to the weights in host RAM, `stream` copies the weights to the GPU for the pass,
`gpu` keeps them resident. The user-facing modes are shorthands:

* `cpu`    -> short=cpu,    long=cpu
* `stream` -> short=stream, long=stream
* `gpu`    -> short=gpu,    long=gpu
* `auto`   -> short=cpu,    long=stream, crossover measured at start-up (and layers promoted to `gpu` while the
  `max_gpu_memory` budget allows).

The crossover depends on the pass kind: a no-grad pass (decode, prefill, reference) pays one layer copy to stream, a
training pass (its backward follows) two, and their CPU costs differ too, so `auto` keeps one crossover for each
(`infer_crossover_tokens`, `crossover_tokens`). A crossover given by a rule applies to both kinds.
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

    `short` runs passes with fewer than the crossover's tokens, `long` the rest: `crossover_tokens` for training
    passes, `infer_crossover_tokens` for no-grad passes (None: the same as `crossover_tokens`).
    `crossover_tokens=None` means "measure both at start-up" (only meaningful when short != long). `cpu_threads` and
    `chunk_size` tune the CPU path (KTransformers' `cpu_infer` / `chunk_size`).
    """

    short: Target = "cpu"
    long: Target = "stream"
    crossover_tokens: int | None = None
    infer_crossover_tokens: int | None = None
    cpu_threads: int | None = None
    chunk_size: int = 8192
    source: str = "default"  # which rule or option decided this, for the placement table
    # What a KTransformers rule asked for long passes when kllama decides them by measurement instead (its
    # `prefill_device: cpu` means "experts in host RAM"; training passes then run where they measure fastest).
    asked_long: Target | None = None

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

    def crossover(self, training: bool) -> int | None:
        """The crossover of a training pass (`training`) or of a no-grad pass (None: not known yet)."""
        if not training and self.infer_crossover_tokens is not None:
            return self.infer_crossover_tokens
        return self.crossover_tokens

    def target_for(self, num_tokens: int, training: bool = False) -> Target:
        """Which target runs a pass over `num_tokens` tokens; `training`: a backward will follow it."""
        if self.short == self.long:
            return self.short
        threshold = self.crossover(training) or 0
        return self.short if num_tokens < threshold else self.long

    def with_crossover(self, tokens: int) -> "ExpertPlacement":
        """A copy with one crossover token count for both pass kinds."""
        return replace(self, crossover_tokens=tokens, infer_crossover_tokens=None)

    def with_crossovers(self, inference: int, training: int) -> "ExpertPlacement":
        """A copy with measured crossovers for no-grad and training passes."""
        return replace(self, crossover_tokens=training, infer_crossover_tokens=inference)
