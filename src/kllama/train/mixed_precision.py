"""Mixed precision (`bf16: true` / `fp16: true`) for the LoRA branches of a training run.

kllama computes log-probs from the decoder's hidden states (`trainer.policy_logps` calls the decoder itself), so
the autocast that accelerate wraps around the whole model's `forward` never runs in a single-process run. Without
it PEFT runs every LoRA branch in the adapters' fp32: the activation cast to fp32, fp32 matmuls, and a branch output
the full width of the layer in fp32 that is scaled, added to the bf16 result and cast back. That is the precision a
LLaMA-Factory or TRL run (HF Trainer's autocast) does not pay for: there the branch's matmuls run in bf16 with the
fp32 adapter weights cast on the fly, as here. Only the branches are autocast; the frozen layers (a router's fp32
logits included) compute exactly as before. A data-parallel run does go through the model's `forward` (DDP's), so
`WholeModelAutocastOff` takes accelerate's autocast off there: one GPU and many compute the same model.
`KllamaTrainer` applies both under `bf16`/`fp16`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback


_MARK = "_kllama_branch_autocast"  # on a LoRA layer whose branches are autocast: the dtype


class _BranchAutocast:
    """Forward pre-hook and hook of one LoRA matrix (`lora_A` / `lora_B` Linear): its call runs under autocast."""

    def __init__(self, device_type: str, dtype: torch.dtype) -> None:
        self.device_type, self.dtype = device_type, dtype
        self.open: list[torch.autocast] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        context = torch.autocast(self.device_type, dtype=self.dtype)
        context.__enter__()
        self.open.append(context)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.open.pop().__exit__(None, None, None)


def autocast_lora_branches(model: nn.Module, device_type: str, dtype: torch.dtype) -> list[RemovableHandle]:
    """Run every LoRA Linear branch of `model` under `torch.autocast(device_type, dtype)`, with PEFT's cast of the
    input to the adapter dtype off (autocast casts it straight back; the input stays in the activations' dtype).
    Returns the hooks' handles (`remove()` each, and set `cast_input_dtype_enabled` back, to undo)."""
    hook = _BranchAutocast(device_type, dtype)
    handles: list[RemovableHandle] = []
    for module in model.modules():
        if not isinstance(module, LoraLinear) or getattr(module, "lora_variant", None):
            # only PEFT's Linear calls its branches on the input; a variant (DoRA, ...) reads the adapter weights
            # itself, and a `target_parameters` wrapper (experts) adds a delta weight cast to the weight's dtype
            continue
        if getattr(module, _MARK, None) is not None:
            continue  # already done (by the trainer and by a benchmark's setup, say)
        setattr(module, _MARK, dtype)
        branches = [m for part in (module.lora_A, module.lora_B) for m in part.values() if isinstance(m, nn.Linear)]
        if not branches:
            continue
        module.cast_input_dtype_enabled = False
        for branch in branches:
            handles.append(branch.register_forward_pre_hook(hook.enter))
            handles.append(branch.register_forward_hook(hook.leave, always_call=True))
    return handles


def mixed_precision_dtype(bf16: bool, fp16: bool) -> torch.dtype | None:
    """The autocast dtype a run's `bf16` / `fp16` setting asks for, or None (full precision)."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None


class WholeModelAutocastOff(TrainerCallback):
    """At the start of training, takes off the autocast accelerate wraps around the model's `forward` under
    mixed precision (`Accelerator.unwrap_model(..., keep_fp32_wrapper=False)`). A single-process run never went
    through it (kllama calls the decoder itself); a data-parallel run does (DDP's forward calls the model's), so
    without this its frozen layers would compute in bf16 where a single process computes them as loaded: one GPU
    and many would train a different model. With it, both autocast only the LoRA branches."""

    def __init__(self, prepared: Callable[[], tuple[Any, nn.Module]]) -> None:
        self.prepared = prepared  # -> (the trainer's accelerator, its wrapped model), read when training starts

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        accelerator, wrapped = self.prepared()
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
