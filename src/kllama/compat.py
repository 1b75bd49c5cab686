"""Deprecations raised by one library's use of another, silenced in one place (kllama's own code uses current names).

Each entry hides exactly one message, only around the call that triggers it.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around `get_peft_model` / `PeftModel.from_pretrained`: PEFT 0.21 reads `model.is_gradient_checkpointing`
    when it wraps a model, a name transformers (5.2x) deprecated for `is_activation_checkpointing` with a
    FutureWarning. The warning is about PEFT's code, which kllama cannot change; nothing else is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
