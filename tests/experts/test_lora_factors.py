"""No-grad passes take a frozen expert LoRA's per-expert factors from `HostExperts.lora_factors`, made once: the same
numbers as making them in every pass, bit for bit, remade when the LoRA is written, never kept for a trainable LoRA.

The resident (`gpu` target) executor runs on the compute device: CUDA where there is one, else the CPU (its code is
the same there)."""
from __future__ import annotations

import pytest
import torch

from kllama.experts import ExpertPlacement, HostExperts
from kllama.experts import routed
from kllama.experts.lora import ExpertLoRA
from kllama.experts.routed import LoraFactors, routed_experts_math
from kllama.experts.stream import DeviceExecutor

E, H, I, R = 8, 64, 48, 8  # noqa: E741  (dims multiple of 8: torch's grouped GEMM takes them on CUDA)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RESIDENT = DeviceExecutor(stream=False)


def lora_layer(dtype: torch.dtype, trainable: bool = False, seed: int = 0) -> HostExperts:
    """A resident layer with LoRA on both projections (fp32 parameters, random non-zero B), frozen unless
    `trainable` (as `kllama chat` loads an adapter)."""
    gen = torch.Generator().manual_seed(seed)
    layer = HostExperts((torch.randn(E, 2 * I, H, generator=gen) * 0.2).to(dtype),
                        (torch.randn(E, H, I, generator=gen) * 0.2).to(dtype), torch.nn.SiLU(),
                        ExpertPlacement.from_mode("gpu"), "model.layers.1.mlp.experts", compute_device=DEVICE)
    for target, (n_in, n_out) in {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}.items():
        lora = ExpertLoRA(E, n_in, n_out, R, 16, device=DEVICE, dtype=torch.float32)
        lora.reset_parameters(gen)
        with torch.no_grad():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=gen) * 0.3)
        lora.requires_grad_(trainable)
        layer.lora[target] = lora
    return layer


def active(layer: HostExperts) -> tuple[tuple[tuple[str, float], ...], list[torch.Tensor]]:
    meta = tuple((target, lora.scaling) for target, lora in layer.lora.items())
    return meta, [p for lora in layer.lora.values() for p in (lora.lora_A, lora.lora_B)]


def inputs(tokens: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen)
    index = torch.rand(tokens, E, generator=gen).topk(2, dim=-1).indices
    weights = torch.rand(tokens, 2, generator=gen)
    return x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE)


def uncached(layer: HostExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The pass as it was before the factors were kept: PEFT-layout factors, made per expert inside the pass."""
    lora = {target: LoraFactors(m.lora_A.detach(), m.lora_B.detach(), m.scaling) for target, m in layer.lora.items()}
    return routed_experts_math(x, index, weights, *layer.resident_weights(), layer.act_fn, lora)


def no_grad_pass(layer: HostExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    meta, params = active(layer)
    with torch.no_grad():
        return RESIDENT.forward(layer, x, index, weights, meta, params, keep=False)[0]


class CountCalls:
    """Wraps `routed.expert_factors` (which every per-expert factor comes from) and counts its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls, self._inner = 0, routed.expert_factors
        monkeypatch.setattr(routed, "expert_factors", self)

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        return self._inner(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_kept_factors_give_the_uncached_pass_bit_for_bit(dtype: torch.dtype, tokens: int) -> None:
    layer = lora_layer(dtype)
    x, index, weights = inputs(tokens)
    expect = uncached(layer, x, index, weights)
    first, again = no_grad_pass(layer, x, index, weights), no_grad_pass(layer, x, index, weights)
    assert first.dtype == expect.dtype and torch.equal(first, expect) and torch.equal(again, expect)
    base = layer.lora_enabled
    layer.lora_enabled = False
    with torch.no_grad():
        without = RESIDENT.forward(layer, x, index, weights, (), [], keep=False)[0]
    layer.lora_enabled = base
    assert not torch.allclose(without, expect)  # the LoRA counts in what was compared


def test_no_grad_passes_make_the_factors_once_and_again_after_a_write(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = lora_layer(torch.bfloat16)
    x, index, weights = inputs(3)
    meta, params = active(layer)
    count = CountCalls(monkeypatch)
    for _ in range(5):
        no_grad_pass(layer, x, index, weights)
    assert count.calls == 2  # one per projection, not one per projection and pass
    held = layer.lora_factors(meta, params, DEVICE)
    assert all(layer.lora_factors(meta, params, DEVICE)[t].a is held[t].a for t in held)

    with torch.no_grad():  # an in-place write moves the version counter: the factors are remade
        layer.lora["down_proj"].lora_B.mul_(2)
    got = no_grad_pass(layer, x, index, weights)
    assert count.calls == 4 and layer.lora_factors(meta, params, DEVICE)["down_proj"].b is not held["down_proj"].b
    assert torch.equal(got, uncached(layer, x, index, weights))

    before = got
    other = lora_layer(torch.bfloat16, seed=5)  # an adapter loaded over this one (Module.load_state_dict: copy_)
    layer.lora.load_state_dict(other.lora.state_dict())
    calls = count.calls
    got = no_grad_pass(layer, x, index, weights)
    assert count.calls == calls + 2
    assert torch.equal(got, uncached(layer, x, index, weights)) and not torch.allclose(got, before)


def test_a_trainable_lora_is_never_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # an optimiser may write the parameters without moving their version counters (fused AdamW, `.data`): a no-grad
    # pass between training steps (evaluation) must still see the new values
    layer = lora_layer(torch.float32, trainable=True)
    x, index, weights = inputs(4)
    count = CountCalls(monkeypatch)
    no_grad_pass(layer, x, index, weights)
    b = layer.lora["gate_up_proj"].lora_B
    version = b._version
    b.data.mul_(3)
    assert b._version == version  # the write the version counter does not see
    got = no_grad_pass(layer, x, index, weights)
    assert count.calls == 4  # made in each pass
    assert torch.equal(got, uncached(layer, x, index, weights))


def test_a_training_pass_after_kept_no_grad_passes_differentiates_the_current_lora() -> None:
    # the training pass makes its factors from the parameters it differentiates (hand-written backward), whatever
    # the no-grad passes kept: its output and LoRA grads equal autograd through the shared math
    layer = lora_layer(torch.float32)
    x, index, weights = inputs(6)
    no_grad_pass(layer, x, index, weights)  # kept while frozen
    layer.lora.requires_grad_(True)
    with torch.no_grad():
        layer.lora["gate_up_proj"].lora_A.add_(0.01)  # a step between: the kept factors are stale
    meta, params = active(layer)
    grad_out = torch.randn(6, H, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out, saved = RESIDENT.forward(layer, x, index, weights, meta, params, keep=True)
    grads = RESIDENT.backward(layer, saved, grad_out, meta, params, [False, False, True, True, True, True])[2:]

    leaves = [p.detach().clone().requires_grad_() for p in params]
    lora = {target: LoraFactors(leaves[2 * i], leaves[2 * i + 1], s) for i, (target, s) in enumerate(meta)}
    expect = routed_experts_math(x, index, weights, *layer.resident_weights(), layer.act_fn, lora)
    expect.backward(grad_out)
    torch.testing.assert_close(out, expect.detach(), rtol=1e-5, atol=1e-6)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-6)
