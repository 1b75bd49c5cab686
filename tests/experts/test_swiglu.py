"""Where the fused gated activation applies (kllama.experts.swiglu); its numbers are checked on the GPU
(test_swiglu_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from kllama.experts.families import FAMILIES, find_expert_modules
from kllama.experts.swiglu import fused_gated, fused_gated_backward, is_silu
from kllama.model.tiny import build_tiny_model


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_supported_family_gates_with_silu(arch: str) -> None:
    # the kernels compute silu(gate) * up: each family's experts must use exactly that activation
    model = build_tiny_model(arch, seed=0)
    for module in find_expert_modules(model).values():
        assert is_silu(module.act_fn), type(module.act_fn)


def test_other_activations_are_not_taken_for_silu() -> None:
    assert is_silu(torch.nn.functional.silu) and is_silu(torch.nn.SiLU())
    assert not is_silu(torch.nn.GELU()) and not is_silu(torch.nn.functional.gelu) and not is_silu(torch.tanh)


def test_cpu_tensors_take_the_eager_ops() -> None:
    hidden = torch.randn(4, 16, dtype=torch.bfloat16)
    ws = torch.rand(4, 1, dtype=torch.bfloat16)
    assert fused_gated(hidden, ws, torch.nn.SiLU()) is None
    assert fused_gated_backward(hidden, hidden[:, :8].contiguous(), ws, torch.nn.SiLU(), want_act=True,
                                want_weight_grad=True) is None
