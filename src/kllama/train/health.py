"""Training health: stop on a non-finite loss or gradient before it reaches the weights; warn on a dead gradient.

transformers' Trainer would go on after a NaN: with `logging_nan_inf_filter` (its default) the logged loss even hides
it, the optimiser writes NaN into every LoRA tensor, and the checkpoints and the final adapter carry them. Here a
callback checks each optimiser step *before* `optimizer.step()` (`on_pre_optimizer_step`): the micro-step losses of
that step (recorded by the trainer's `compute_loss`, no host sync there) and the gradients (after clipping, so a
non-finite pre-clip norm shows as non-finite gradients). One host sync per optimiser step. A failure raises a
KllamaError naming the step and the metric: the weights are still those of the last good step, and nothing of the
bad step is saved, so the newest published checkpoint stays the last good one.

A gradient norm of exactly 0 for `zero_grad_patience` logged steps in a row means nothing is being learned; the usual
cause is a learning rate so high that the first steps saturated the model (or so low that updates underflow).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kllama.errors import KllamaError

ZERO_GRAD_PATIENCE = 10
# logged metrics that must stay finite -> how a message names them
WATCHED_LOGS: dict[str, str] = {"loss": "loss", "grad_norm": "gradient norm", "eval_loss": "evaluation loss"}


def gradient_norm(model: nn.Module) -> torch.Tensor | None:
    """Total L2 norm of every gradient of `model` (fp32 scalar on the first gradient's device), None without any."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads]  # grads may span devices
    return torch.linalg.vector_norm(torch.stack(norms))


class TrainingHealth(TrainerCallback):
    """Raise on a non-finite loss or gradient (before the optimiser step); warn once on a long zero gradient norm.

    `checkpoints_dir` is where published checkpoints live (named in the message); `stream` receives the warning.
    """

    def __init__(self, checkpoints_dir: str | Path | None = None, *, zero_grad_patience: int = ZERO_GRAD_PATIENCE,
                 stream: TextIO | None = None):
        self.checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir is not None else None
        self.zero_grad_patience = zero_grad_patience
        self.stream = stream
        self._losses: list[torch.Tensor] = []
        self._zero_run: list[int] = []  # global steps of the current run of zero gradient norms
        self.warned_zero_grad = False

    # -------------------------------------------------------------- checks
    def record_loss(self, loss: torch.Tensor) -> None:
        """Keep one training micro-step's loss (a scalar tensor; checked at the next optimiser step)."""
        self._losses.append(loss.detach().float().reshape(()))

    def recorded_losses(self) -> int:
        """How many micro-step losses wait for the next optimiser step's check."""
        return len(self._losses)

    def forget_losses_after(self, count: int) -> None:
        """Drop the losses recorded after the first `count` (a micro-step that is run again)."""
        del self._losses[count:]

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: nn.Module | None = None, **kwargs: Any) -> None:
        step = state.global_step + 1
        losses, self._losses = self._losses, []
        values: list[torch.Tensor] = []
        if losses:
            device = losses[0].device
            values += [loss.to(device) for loss in losses]
        norm = gradient_norm(model) if model is not None else None
        if norm is not None:
            values.append(norm.to(values[0].device) if values else norm)
        if not values:
            return
        host = torch.stack(values).tolist()  # the one host sync of the step
        loss_values, norm_value = (host[:-1], host[-1]) if norm is not None else (host, None)
        bad_loss = next((v for v in loss_values if not math.isfinite(v)), None)
        if bad_loss is not None:
            self._stop(step, "loss", bad_loss)
        if norm_value is not None and not math.isfinite(norm_value):
            self._stop(step, "gradient norm", norm_value)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        for key, name in WATCHED_LOGS.items():
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._stop(state.global_step, name, value)
        grad_norm = logs.get("grad_norm")
        if grad_norm is None:
            return
        if grad_norm == 0:
            self._zero_run.append(state.global_step)
        else:
            self._zero_run = []
        if len(self._zero_run) >= self.zero_grad_patience and not self.warned_zero_grad and state.is_world_process_zero:
            self.warned_zero_grad = True
            print(
                f"kllama train: warning: grad_norm has been 0 for {len(self._zero_run)} logged steps in a row (steps "
                f"{self._zero_run[0]}-{self._zero_run[-1]}): nothing is being learned. The learning rate "
                f"(learning_rate: {args.learning_rate:g}) is the likely cause: too high a rate saturates the model in "
                "its first steps; lower it (DPO usually trains at 5e-7 to 5e-5) and start again.",
                file=self.stream or sys.stderr, flush=True,
            )

    # -------------------------------------------------------------- reporting
    def _stop(self, step: int, metric: str, value: float) -> None:
        from kllama.train.checkpoints import list_checkpoints

        checkpoints = list_checkpoints(self.checkpoints_dir) if self.checkpoints_dir is not None else []
        kept = (f"the newest checkpoint, {checkpoints[-1]}, holds the last good weights (resume_from_checkpoint: true "
                "continues from it)" if checkpoints else "no checkpoint and no adapter were written")
        raise KllamaError(
            f"training stopped at step {step}: the {metric} is {value} (not finite). Nothing of this step was saved; "
            f"{kept}. Usual causes: too high a learning_rate, fp16 overflow (use bf16), or NaN/inf values in the "
            "model weights or the adapter it starts from."
        )
