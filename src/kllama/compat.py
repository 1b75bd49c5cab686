"""Warnings raised by one library's use of another, handled in one place (kllama's own code uses current names).

Each entry deals with exactly one message, only around the call that triggers it.
"""
from __future__ import annotations

import ast
import contextlib
import re
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

from torch import nn

Wrapped = TypeVar("Wrapped", bound=nn.Module)

# PEFT 0.21's check of rank_pattern / alpha_pattern keys (`BaseTuner.inject_adapter`) tests them against the targeted
# *modules* only. Its own transformers v4 -> v5 MoE conversion (`_convert_peft_config_moe`) writes the key
# `.*\.gate_up_proj` (rank 2r for the fused gate + up experts of an adapter naming gate_proj/up_proj), which targets a
# *parameter* (`target_parameters`): PEFT applies it, then warns that it was ignored.
_PATTERN_WARNING = re.compile(r"The following (rank|alpha)_pattern keys did not match any targeted module and were "
                              r"ignored: (?P<keys>\[.*\])\.$", re.DOTALL)


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around `get_peft_model` / `PeftModel.from_pretrained`: PEFT 0.21 reads `model.is_gradient_checkpointing`
    when it wraps a model, a name transformers (5.2x) deprecated for `is_activation_checkpointing` with a
    FutureWarning. The warning is about PEFT's code, which kllama cannot change; nothing else is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _applied_to_parameters(message: str, peft_model: nn.Module) -> bool:
    """Whether every key PEFT's pattern warning calls ignored matches a parameter it targeted (so it was applied),
    with PEFT's own matching rule `(.*\\.)?(key)$`."""
    found = _PATTERN_WARNING.match(message)
    names = getattr(getattr(peft_model, "base_model", None), "targeted_parameter_names", None)
    if found is None or not names:
        return False
    keys = ast.literal_eval(found["keys"])
    return all(any(re.match(rf"(.*\.)?({key})$", name) for name in names) for key in keys)


def peft_wrapped(build: Callable[[], Wrapped]) -> Wrapped:
    """`build()` (a `get_peft_model` / `PeftModel.from_pretrained` call) inside `peft_wrapping`, minus PEFT's false
    "rank_pattern / alpha_pattern keys ... were ignored" warning for keys that matched a targeted parameter (see
    `_PATTERN_WARNING`). A key that matched nothing is still reported, as are all other warnings."""
    with warnings.catch_warnings(record=True) as caught, peft_wrapping():
        # "always" for this one message only: recorded (not raised under -W error) so it can be checked below
        warnings.filterwarnings("always", message=r"The following (rank|alpha)_pattern keys did not match",
                                category=RuntimeWarning)
        model = build()
    for item in caught:
        if not (item.category is RuntimeWarning and _applied_to_parameters(str(item.message), model)):
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno, source=item.source)
    return model
