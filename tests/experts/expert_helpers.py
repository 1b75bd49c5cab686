"""Helpers shared by the GPU expert tests: a relative error, one forward+backward of a model, and a small stack of
streamed expert layers wired to one streamer."""
from __future__ import annotations

import torch

from kllama.experts import ExpertPlacement, ExpertStreamer, HostExperts
from kllama.experts.quant import quantize


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(model: torch.nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits, the input gradient and every parameter gradient of one forward+backward of `model` on `embeds`."""
    leaf = embeds.clone().requires_grad_()
    logits = model(inputs_embeds=leaf).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), leaf.grad, grads


def streamed_stack(device: torch.device, count: int = 4,
                   scheme: str | None = None) -> tuple[list[HostExperts], ExpertStreamer]:
    """`count` expert layers (8 experts, hidden 128, intermediate 128; bf16, or quantized with `scheme`) streamed to
    `device` by one tracing streamer."""
    def weights() -> tuple:
        gate_up = torch.randn(8, 256, 128, dtype=torch.bfloat16) * 0.05
        down = torch.randn(8, 128, 128, dtype=torch.bfloat16) * 0.05
        return (gate_up, down) if scheme is None else (quantize(gate_up, scheme, projections=2),
                                                       quantize(down, scheme))

    layers = [
        HostExperts(*weights(), torch.nn.SiLU(), ExpertPlacement.from_mode("stream"), f"model.layers.{i}.mlp.experts",
                    compute_device=device)
        for i in range(count)
    ]
    streamer = ExpertStreamer(layers, device, trace=True)
    for layer in layers:
        layer.streamer = streamer
    return layers, streamer
