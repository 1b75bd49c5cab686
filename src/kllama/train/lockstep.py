"""The DPO reference forward in lock-step with the policy's: one pass over the layers instead of two.

The reference model is the policy with its adapters off, run on the same rows. Run as its own pass, it goes through
every decoder layer again after the policy's forward, so each streamed layer's experts are copied to the GPU once
more: with the seed YAML's ~6.5k-token steps a DPO step is three copies of every streamed layer (reference forward,
policy forward, recompute + backward), and the copies are the step's cost (benchmarks/NOTES.md). Here the reference
runs inside the policy's forward instead: right after the policy computes decoder layer i, the same layer runs once
more on the reference's hidden states, without gradients and with that layer's adapters off, while its experts
are still in their GPU slot. A step then copies each streamed layer twice.

The math is that of the separate pass: what enters layer 0 does not depend on the adapters (embeddings and rotary
tables carry none: `LockstepReference.of` checks), every layer gets the same keyword arguments (mask, positions,
rotary tables) as in a pass of its own, and the final norm and the log-probs follow as before. The reference holds one
extra hidden state `[B, T, H]` and a no-grad layer's transient buffers, which the policy's activations exceed.

Hooks are registered only for the policy forward (`following`), so a backward's recompute of a checkpointed layer
does not run the reference again. The reference's layers run in an empty `contextvars.Context`, where transformers'
output recorders (router logits for the aux loss) are inactive: only the policy's outputs are recorded.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from kllama.model.adapters import adapters_disabled_in


class LockstepReference:
    """Computes the reference's last hidden state during a policy forward through the decoder `layers` (followed by
    the decoder's final `norm`)."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module) -> None:
        self.layers, self.norm = layers, norm

    @classmethod
    def of(cls, lm: nn.Module) -> "LockstepReference | None":
        """The lock-step reference of a causal LM (`lm.model.layers`, `lm.model.norm`, `lm.lm_head`), or None where
        the reference differs from the policy before the first layer or after the last: an adapter outside the
        decoder layers (embeddings, norm, head), or a model without that layout."""
        decoder = getattr(lm, "model", None)
        layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not isinstance(norm, nn.Module):
            return None
        inside = {id(m) for layer in layers for m in layer.modules()}
        outside = [m for m in lm.modules() if id(m) not in inside and isinstance(m, BaseTunerLayer)]
        return None if outside else cls(layers, norm)

    @contextlib.contextmanager
    def following(self) -> Iterator[Callable[[], torch.Tensor]]:
        """Inside the block, a forward of the decoder also runs the reference through each layer after the policy;
        yields a function that returns the reference's final-normed hidden states `[B, T, H]` once the forward
        has run (no gradient)."""
        state: dict[str, Any] = {"hidden": None}

        def take_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            state["hidden"] = hidden.detach()

        def run_reference(layer: nn.Module, args: tuple, kwargs: dict, _output: Any) -> None:
            hidden = state["hidden"]
            if "hidden_states" in kwargs:
                kwargs = {**kwargs, "hidden_states": hidden}
            else:
                args = (hidden, *args[1:])
            def reference_layer() -> Any:
                # `forward`, not the module call: the layer's own hooks (this one, output capture) stay out of it
                with torch.no_grad(), adapters_disabled_in(layer):
                    return layer.forward(*args, **kwargs)

            # In an empty context: transformers records a forward's extra outputs (router logits for the aux loss)
            # into a collector held in a context variable set for the policy's forward, from hooks on submodules
            # such as the router; the reference's calls must not add to the policy's.
            out = contextvars.Context().run(reference_layer)
            state["hidden"] = out[0] if isinstance(out, tuple) else out

        handles = [self.layers[0].register_forward_pre_hook(take_input, with_kwargs=True)]
        handles += [layer.register_forward_hook(run_reference, with_kwargs=True) for layer in self.layers]

        def final() -> torch.Tensor:
            if state["hidden"] is None:
                raise RuntimeError("the lock-step reference has no hidden state: no decoder forward ran in the block")
            with torch.no_grad():
                return self.norm(state["hidden"])

        try:
            yield final
        finally:
            for handle in handles:
                handle.remove()


def lockstep_for_run(lm: nn.Module, *, stage: str, reference_free: bool, precomputed: bool,
                     starting_adapter: bool, streamed_layers: int) -> LockstepReference | None:
    """The run's lock-step reference, or None where the reference keeps its own pass: not DPO, a reference-free
    loss or precomputed reference log-probs (no reference pass at all), a reference with a starting adapter (its
    weights are swapped in, not switched off), or no streamed layer (nothing to save: the passes cost the same
    either way)."""
    if stage != "dpo" or reference_free or precomputed or starting_adapter or streamed_layers == 0:
        return None
    return LockstepReference.of(lm)


LOCKSTEP_LINE = ("DPO reference: computed inside the policy's forward, layer by layer (each step copies a streamed "
                 "layer's experts twice, not three times)")
