"""A frozen expert LoRA's kept per-expert factors on CUDA: counted in the module's GPU bytes, made before a pass is
called capturable, and the split pass's device side computes with them what it computed making its own.

Run on the GPU box: `.venv/bin/pytest -q -m gpu tests/experts/`.
"""
from __future__ import annotations

import pytest
import torch

from kllama.experts import ExpertPlacement, HostExperts
from kllama.experts.lora import ExpertLoRA

from expert_helpers import streamed_stack

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
E, H, I, R = 8, 128, 128, 8  # noqa: E741


def add_lora(layer: HostExperts, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for target, (n_in, n_out) in {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}.items():
        lora = ExpertLoRA(E, n_in, n_out, R, 16, device=torch.device("cuda"), dtype=torch.float32)
        lora.reset_parameters(gen)
        with torch.no_grad():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=gen) * 0.3)
        layer.lora[target] = lora


def test_kept_factors_count_in_gpu_bytes_and_make_a_resident_pass_capturable() -> None:
    torch.manual_seed(0)
    layer = HostExperts(torch.randn(E, 2 * I, H, dtype=torch.bfloat16) * 0.1,
                        torch.randn(E, H, I, dtype=torch.bfloat16) * 0.1, torch.nn.SiLU(),
                        ExpertPlacement.from_mode("gpu"), "model.layers.0.mlp.experts", compute_device="cuda")
    add_lora(layer, 0)
    layer.lora.requires_grad_(False)
    layer.resident_weights()
    held = layer.gpu_bytes()
    assert not layer.capturable(1)  # the factors are not made yet: a capture would make them in the graph
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    index, weights = torch.tensor([[1, 5]], device="cuda"), torch.rand(1, 2, device="cuda")
    with torch.no_grad():
        layer(x, index, weights)
    assert layer.capturable(1)
    kept = E * R * ((H + 2 * I) + (I + H)) * torch.bfloat16.itemsize  # E*r*(in+out) per projection, weights' dtype
    assert layer.gpu_bytes() == held + kept
    layer.lora.requires_grad_(True)  # trainable: nothing kept, the capture makes the factors at every replay
    assert layer.capturable(1)


@pytest.mark.parametrize("split", [None, 3])
def test_a_frozen_lora_streamed_pass_equals_the_pass_that_makes_its_factors(split: int | None) -> None:
    # streamed, and split (experts [0, 3) on the CPU: its factors are kept on the host, the device side takes the
    # kept device factors' experts [3, E))
    torch.manual_seed(0)
    layers, streamer = streamed_stack(torch.device("cuda"))
    for i, layer in enumerate(layers):
        add_lora(layer, i)
        layer.forced_split = split
    x = torch.randn(96, H, device="cuda", dtype=torch.bfloat16)
    index = torch.rand(96, E, device="cuda").topk(2, dim=-1).indices
    weights = torch.rand(96, 2, device="cuda")

    def forward() -> torch.Tensor:
        streamer.invalidate()
        h = x
        with torch.no_grad():
            for layer in layers:
                h = h + layer(h, index, weights)
        return h

    made_each_pass = forward()  # a trainable LoRA: no-grad passes make its factors every time
    before = sum(layer.gpu_bytes() for layer in layers)
    for layer in layers:
        layer.lora.requires_grad_(False)
    kept, again = forward(), forward()
    if split is None:
        assert torch.equal(kept, made_each_pass) and torch.equal(again, made_each_pass)
    else:  # the CPU rows are added with index_add_, whose CUDA atomics may sum a token's two rows in either order
        torch.testing.assert_close(kept, made_each_pass)
        torch.testing.assert_close(again, made_each_pass)
    assert sum(layer.gpu_bytes() for layer in layers) > before
