"""Helpers shared by the training tests."""
from __future__ import annotations

import torch
from transformers import TrainerCallback


class GradCapture(TrainerCallback):
    """Copies every trainable gradient right before the first optimiser step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
