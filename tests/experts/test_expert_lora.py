"""Expert LoRA: same math and same tensors/keys as PEFT 0.21's `target_parameters` on the stock model."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

from kllama.compat import peft_wrapped
from kllama.errors import KllamaError
from kllama.experts import ExpertLoraSet, ExpertPlacement, install_expert_engine
from kllama.model.tiny import build_tiny_model

FAMILY_ARCHS = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
R, ALPHA = 4, 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def peft_model(arch: str, dtype: torch.dtype = torch.float32):  # noqa: ANN201
    """Stock model + PEFT expert LoRA with random non-zero A and B (so the delta matters)."""
    base = build_tiny_model(arch, seed=0, dtype=dtype)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=TARGET_PARAMETERS)
    model = peft_wrapped(lambda: get_peft_model(base, config))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def our_model(arch: str, dtype: torch.dtype = torch.float32, target: str = "cpu"):  # noqa: ANN201
    model = build_tiny_model(arch, seed=0, dtype=dtype)
    install_expert_engine(model, lambda name: ExpertPlacement.from_mode(target, chunk_size=6), "cpu")
    ExpertLoraSet(model).add(r=R, alpha=ALPHA, seed=0)
    return model


def forward_backward(model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    logits.float().square().mean().backward()
    return logits.detach(), embeds.grad


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_expert_lora_matches_peft_target_parameters(arch: str) -> None:
    ref = peft_model(arch)
    ours = our_model(arch)
    peft_state = get_peft_model_state_dict(ref)
    ExpertLoraSet(ours).load_state_dict(peft_state)  # PEFT's keys and shapes load as they are: same layout
    logits_ref, grad_ref = forward_backward(ref, torch.float32)
    logits, grad = forward_backward(ours, torch.float32)
    assert rel(logits, logits_ref) < 1e-5
    assert rel(grad, grad_ref) < 1e-5
    # LoRA grads, matched through PEFT's key names
    ref_grads = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if "lora_" in n}
    our_state = ExpertLoraSet(ours).state_dict()
    assert sorted(our_state) == sorted(peft_state)
    for name, module in ours.named_modules():
        for target, lora in getattr(module, "lora", {}).items():
            prefix = "base_model.model." + name + (".base_layer." if target == "gate_up_proj" else ".")
            for part in ("lora_A", "lora_B"):
                assert rel(getattr(lora, part).grad, ref_grads[prefix + part + ".weight"]) < 1e-5


def test_expert_lora_bf16_is_as_accurate_as_peft() -> None:
    # In bf16 PEFT folds W + s*B@A into a bf16 weight while we add the low-rank path separately, so the two round
    # differently (~2% on input grads here). The fair check: both against the fp32 truth, ours no worse than PEFT's.
    truth = peft_model("deepseek_v2", torch.float32)
    state = get_peft_model_state_dict(truth)
    logits_true, grad_true = forward_backward(truth, torch.float32)
    ref = peft_model("deepseek_v2", torch.bfloat16)
    logits_ref, grad_ref = forward_backward(ref, torch.bfloat16)
    ours = build_tiny_model("deepseek_v2", seed=0, dtype=torch.bfloat16)
    install_expert_engine(ours, lambda name: ExpertPlacement.from_mode("cpu"), "cpu")
    ExpertLoraSet(ours).add(r=R, alpha=ALPHA, dtype=torch.bfloat16)  # PEFT keeps the adapter in the weights' dtype
    ExpertLoraSet(ours).load_state_dict(state)
    logits, grad = forward_backward(ours, torch.bfloat16)
    assert rel(logits, logits_ref) < 2e-2
    assert rel(grad, grad_ref) < 3e-2
    assert rel(logits, logits_true) < 1.25 * rel(logits_ref, logits_true)
    assert rel(grad, grad_true) < 1.25 * rel(grad_ref, grad_true)


def test_new_lora_is_a_no_op_and_seeded() -> None:
    base = our_model("mixtral")
    again = our_model("mixtral")
    first, second = ExpertLoraSet(base).state_dict(), ExpertLoraSet(again).state_dict()
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)
    a_weights = [v for k, v in ExpertLoraSet(base).state_dict().items() if "lora_A" in k]
    assert all(w.abs().sum() > 0 for w in a_weights)
    stock = build_tiny_model("mixtral", seed=0)
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4]])
        assert torch.allclose(base(ids).logits, stock(ids).logits, atol=1e-6)


def test_lora_disabled_equals_base_model_and_restores() -> None:
    ours = our_model("qwen2_moe")
    with torch.no_grad():
        for module in ours.modules():
            for lora in getattr(module, "lora", {}).values():
                lora.lora_B.normal_(std=0.5)
    stock = build_tiny_model("qwen2_moe", seed=0)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        with_lora = ours(ids).logits
        with ExpertLoraSet(ours).disabled():
            without = ours(ids).logits
        after = ours(ids).logits
        base = stock(ids).logits
    assert torch.allclose(without, base, atol=1e-6)
    assert not torch.allclose(with_lora, base, atol=1e-4)
    assert torch.equal(after, with_lora)
    ExpertLoraSet(ours).set_enabled(False)
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, base, atol=1e-6)


def test_state_dict_round_trip_through_peft_from_pretrained(tmp_path: Path) -> None:
    ours = our_model("olmoe")
    with torch.no_grad():
        for module in ours.modules():
            for lora in getattr(module, "lora", {}).values():
                lora.lora_B.normal_(std=0.5)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(ExpertLoraSet(ours).state_dict(), adapter / "adapter_model.safetensors")
    LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=TARGET_PARAMETERS).save_pretrained(adapter)
    stock = peft_wrapped(lambda: PeftModel.from_pretrained(build_tiny_model("olmoe", seed=0), adapter))
    ids = torch.tensor([[7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, ours(ids).logits, atol=1e-5)
    # and back: PEFT's saved state loads into a fresh engine model
    fresh = our_model("olmoe")
    ExpertLoraSet(fresh).load_state_dict(get_peft_model_state_dict(stock))
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, ours(ids).logits, atol=1e-6)


def test_lora_params_train_and_base_weights_stay_frozen() -> None:
    ours = our_model("deepseek_v3")
    loras = [p for n, p in ours.named_parameters() if "lora_" in n]
    host = [t.clone() for m in ours.modules() if hasattr(m, "host_weights") for t in m.host_weights()]
    ours(torch.tensor([[1, 2, 3, 4, 5]])).logits.square().mean().backward()
    assert loras and all(p.grad is not None for p in loras)
    # PEFT's init (B = 0): B gets a gradient at once, A only after B has moved
    assert all(p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if "lora_B" in n)
    assert all(p.grad.abs().sum() == 0 for n, p in ours.named_parameters() if "lora_A" in n)
    after = [t for m in ours.modules() if hasattr(m, "host_weights") for t in m.host_weights()]
    assert all(torch.equal(a, b) for a, b in zip(host, after))


def test_lora_errors() -> None:
    model = build_tiny_model("mixtral", seed=0)
    with pytest.raises(KllamaError, match="expert engine installed first"):
        ExpertLoraSet(model)
    assert ExpertLoraSet.of(model) is None
    install_expert_engine(model, lambda n: ExpertPlacement(), "cpu")
    with pytest.raises(KllamaError, match="lora_dropout"):
        ExpertLoraSet(model).add(r=4, alpha=8, dropout=0.1)
    with pytest.raises(KllamaError, match="unknown expert LoRA targets"):
        ExpertLoraSet(model).add(r=4, alpha=8, targets=("up_proj",))
    ExpertLoraSet(model).add(r=4, alpha=8)
    bad = {k: v[:, :2] for k, v in ExpertLoraSet(model).state_dict().items()}
    with pytest.raises(KllamaError, match="expected"):
        ExpertLoraSet(model).load_state_dict(bad)
    with pytest.raises(KllamaError, match="missing"):
        ExpertLoraSet(model).load_state_dict({})


def test_keys_follow_peft_nesting_whatever_the_target_order() -> None:
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=TARGET_PARAMETERS[::-1])
    stock = peft_wrapped(lambda: get_peft_model(build_tiny_model("mixtral", seed=0), config))
    peft_keys = sorted(get_peft_model_state_dict(stock))
    ours = build_tiny_model("mixtral", seed=0)
    install_expert_engine(ours, lambda n: ExpertPlacement(), "cpu")
    ExpertLoraSet(ours).add(r=R, alpha=ALPHA, targets=("down_proj", "gate_up_proj"))
    assert sorted(ExpertLoraSet(ours).state_dict()) == peft_keys
    only_down = build_tiny_model("mixtral", seed=0)
    install_expert_engine(only_down, lambda n: ExpertPlacement(), "cpu")
    ExpertLoraSet(only_down).add(r=R, alpha=ALPHA, targets=("down_proj",))
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    stock = peft_wrapped(lambda: get_peft_model(build_tiny_model("mixtral", seed=0), config))
    reference = get_peft_model_state_dict(stock)
    ours_state = ExpertLoraSet(only_down).state_dict()
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in reference.items()}
