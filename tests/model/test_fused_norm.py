"""The models' RMSNorms through torch's `rms_norm` (kllama.model.fused_norm): the transformers form it relies on,
the same bits on the CPU, and what the swap leaves unchanged (names, state dicts, gradients)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kllama.model.fused_norm import RMS_NORM_CLASSES, FusedRMSNorm, fuse_rms_norms
from kllama.model.tiny import TINY_ARCHS, build_tiny_model

CPU = torch.device("cpu")  # the bit-for-bit claims are the CPU's (CUDA's fused kernel sums in its own order)


def _norm_classes() -> dict[str, type]:
    import importlib

    found = {}
    for module_name in ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe",
                        "llama", "qwen2", "qwen3"):
        module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        found.update({name: getattr(module, name) for name in RMS_NORM_CLASSES if hasattr(module, name)})
    return found


def test_every_listed_class_exists_in_transformers() -> None:
    assert sorted(_norm_classes()) == sorted(RMS_NORM_CLASSES)


@pytest.mark.parametrize("name", RMS_NORM_CLASSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_transformers_norm_is_the_weight_times_rms_norm(name: str, dtype: torch.dtype) -> None:
    # the form FusedRMSNorm relies on, pinned per class: same output and input gradient, bit for bit on the CPU
    gen = torch.Generator().manual_seed(3)
    stock = _norm_classes()[name](96, eps=1e-6).to(dtype)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(96, generator=gen) + 1)
    fused = FusedRMSNorm(torch.nn.Parameter(stock.weight.detach().clone()), stock.variance_epsilon)
    x = (torch.randn(3, 5, 96, generator=gen) * 4).to(dtype)
    grad = torch.randn(3, 5, 96, generator=gen).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_stock, out_fused = stock(a), fused(b)
    out_stock.backward(grad)
    out_fused.backward(grad)
    assert out_fused.dtype == out_stock.dtype
    assert torch.equal(out_fused, out_stock)
    assert torch.equal(b.grad, a.grad)
    assert torch.equal(fused.weight.grad, stock.weight.grad)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fused_model_gives_the_same_logits_and_gradients(arch: str) -> None:
    stock = build_tiny_model(arch, seed=0, dtype=torch.bfloat16).to(CPU)
    fused = build_tiny_model(arch, seed=0, dtype=torch.bfloat16).to(CPU)
    keys = list(stock.state_dict())
    count = fuse_rms_norms(fused)
    layers = stock.config.num_hidden_layers
    assert count >= 2 * layers + 1  # input and post-attention norms of each layer, the final norm (+ q/k/kv norms)
    assert not [m for m in fused.modules() if type(m).__name__ in RMS_NORM_CLASSES]
    assert list(fused.state_dict()) == keys
    assert fuse_rms_norms(fused) == 0  # idempotent
    ids = torch.randint(0, stock.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (stock, fused):
        model.train()
        logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l_stock, g_stock), (l_fused, g_fused) = outs
    assert torch.equal(l_fused, l_stock)
    assert g_fused.keys() == g_stock.keys()
    assert all(torch.equal(g_fused[n], g_stock[n]) for n in g_stock)


def test_a_look_alike_class_outside_transformers_is_left_alone() -> None:
    # remote code may name its norm like transformers' and compute it otherwise (here: Gemma's 1 + weight)
    class DeepseekV2RMSNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (1 + self.weight) * F.rms_norm(x, (4,), eps=self.variance_epsilon)

    model = torch.nn.Sequential(DeepseekV2RMSNorm())
    assert fuse_rms_norms(model) == 0
    assert type(model[0]) is DeepseekV2RMSNorm


def test_models_without_listed_norms_are_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert fuse_rms_norms(model) == 0
    assert isinstance(model[1], torch.nn.LayerNorm)
    x = torch.randn(2, 4)
    assert torch.equal(model(x), F.layer_norm(model[0](x), (4,), model[1].weight, model[1].bias))


@pytest.mark.parametrize("value", [True, False])
def test_llamafactory_liger_key_is_accepted(value: bool) -> None:
    # LLaMA-Factory YAMLs may carry enable_liger_kernel; kllama fuses the same ops itself, whatever it says
    from kllama.config import build_config

    config = build_config({"model_name_or_path": "m", "enable_liger_kernel": value}, command="chat",
                          check_paths=False)
    assert config.model.enable_liger_kernel is value
