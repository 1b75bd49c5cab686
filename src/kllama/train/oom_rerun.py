"""A training step that runs out of GPU memory: rerun it after undoing a promotion, or stop with a clear error.

Layers promoted after a measured step (`kllama.train.promotion`) rest on an estimate; if a later step still runs out
of GPU memory, the trainer demotes them, puts back the state the step began with (`StepStart`: no gradients, the
RNG states, the step's metric records) and runs the step again, so the rerun is the same computation as a step that
never failed. An out-of-memory error with nothing to demote (or with gradients accumulated by earlier micro-steps
of the same optimizer step, which cannot be put back, or in a multi-process run whose other ranks are inside the
step), or in the rerun itself, ends the run with a `KllamaError` naming the settings that change a step's memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kllama.errors import KllamaError


@dataclass
class StepStart:
    """What a training step began with, to run it again from there: gradients, RNG states, and the trainer's own
    records of the step (`bookkeeping`, opaque here: the trainer captures and restores it)."""

    fresh_grads: bool  # no trainable parameter held a gradient (the first micro-step of an optimizer step)
    cpu_rng: torch.Tensor
    cuda_rng: dict[int, torch.Tensor]
    bookkeeping: Any

    @classmethod
    def capture(cls, model: nn.Module, bookkeeping: Any) -> "StepStart":
        devices = {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
        return cls(
            fresh_grads=all(p.grad is None for p in model.parameters() if p.requires_grad),
            cpu_rng=torch.get_rng_state(),
            cuda_rng={d: torch.cuda.get_rng_state(d) for d in devices},
            bookkeeping=bookkeeping,
        )

    def restore(self, model: nn.Module) -> None:
        """Put the model's gradients (none) and the RNG states back as they were when this was captured."""
        for p in model.parameters():
            p.grad = None
        torch.set_rng_state(self.cpu_rng)
        for device, state in self.cuda_rng.items():
            torch.cuda.set_rng_state(state, device)


def can_rerun(start: StepStart, promotion: Any, processes: int) -> bool:
    """Whether a step that ran out of GPU memory is run again: layers were promoted after load (demoting them frees
    memory), the step's gradients can be put back (none before it), and no other rank waits inside the step."""
    return promotion is not None and bool(promotion.promoted) and start.fresh_grads and processes == 1


def rerun_line(step: int, layers: int) -> str:
    """The line printed when a step is run again after its promoted layers were demoted."""
    return (f"step {step} ran out of GPU memory after {layers} promoted layer{'s' if layers != 1 else ''}: demoted "
            f"them, running the step again; promotion is off for this run")


def out_of_memory_error(step: int, error: BaseException) -> KllamaError:
    """The error a training step's out-of-memory ends the run with (nothing left to demote)."""
    detail = str(error).split(". ", 1)[0].strip() or "CUDA out of memory"
    return KllamaError(
        f"training step {step} ran out of GPU memory ({detail}). A step holds the activations of its largest pass: "
        f"lower micro_batch_tokens (the tokens of one pass), per_device_train_batch_size or cutoff_len; with "
        f"max_gpu_memory set, a larger value (if the GPU has room) leaves a step more memory")
