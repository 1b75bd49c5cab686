"""Mixed precision for the LoRA branches (`kllama.train.mixed_precision`): each branch's matmuls run in the
activations' dtype with the fp32 adapters cast on the fly, as under HF Trainer's autocast; the frozen layers compute
as before; no activation-sized cast to fp32 is left; a whole DPO step through kllama's trainer runs that way."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from train_helpers import GradCapture, OpCounter

from kllama.model.load import compute_device
from kllama.train.mixed_precision import autocast_lora_branches, mixed_precision_dtype


def activation_casts(numel: int) -> OpCounter:
    """Counts dtype casts (`aten._to_copy`) whose output has at least `numel` elements."""
    return OpCounter(lambda func, out: func is torch.ops.aten._to_copy.default and out.numel() >= numel)


class Block(nn.Module):
    """A bf16 projection (adapted) and a router-like projection that computes in fp32 on purpose, as MoE routers do
    (frozen, not adapted)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 48, bias=False)
        self.router = nn.Linear(32, 8, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), nn.functional.linear(x.float(), self.router.weight.float())


def _adapted(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    block = Block().to(device=device, dtype=torch.bfloat16)
    model = get_peft_model(block, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def test_a_branch_runs_in_the_activation_dtype_and_frozen_layers_as_before():
    device = compute_device()
    model = _adapted(device)
    x = torch.randn(64, 32, device=device, dtype=torch.bfloat16)
    before_proj, before_router = model(x)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # PEFT's fp32 adapters
    handles = autocast_lora_branches(model, device.type, torch.bfloat16)
    assert len(handles) == 4  # a pre-hook and a hook on lora_A and on lora_B of the one adapted layer
    assert autocast_lora_branches(model, device.type, torch.bfloat16) == []  # once is enough (trainer + benchmark)
    proj, router = model(x)
    layer = model.base_model.model.proj
    a, b = (m.weight.to(torch.bfloat16) for m in (layer.lora_A["default"], layer.lora_B["default"]))
    want = layer.base_layer(x) + (x @ a.T @ b.T) * layer.scaling["default"]
    assert proj.dtype == torch.bfloat16
    exact = {"rtol": 0, "atol": 0} if device.type == "cpu" else {}  # a GPU may pick another GEMM algorithm per call
    torch.testing.assert_close(proj, want, **exact)
    torch.testing.assert_close(proj, before_proj, rtol=2e-2, atol=2e-2)  # the fp32 branch, to bf16 rounding
    # the router's fp32 matmul outside the branches is untouched (only the adapter branch is autocast)
    assert router.dtype == torch.float32 and torch.equal(router, before_router)
    proj.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert not torch.is_autocast_enabled(device.type)  # every hook closed its context


def test_no_activation_sized_cast_is_left():
    device = compute_device()
    x = torch.randn(256, 32, device=device, dtype=torch.bfloat16)
    counts = []
    for hooked in (False, True):
        model = _adapted(device)
        if hooked:
            autocast_lora_branches(model, device.type, torch.bfloat16)
        counter = activation_casts(x.numel())
        with counter:
            proj, _ = model(x)
            proj.float().sum().backward()
        counts.append(counter.count)
    assert counts[1] < counts[0], counts


@pytest.mark.parametrize("bf16,fp16,want", [(True, False, torch.bfloat16), (False, True, torch.float16),
                                            (False, False, None)])
def test_the_run_setting_picks_the_dtype(bf16, fp16, want):
    assert mixed_precision_dtype(bf16, fp16) == want


def _step(model_dir: Path, tmp: Path, branches_autocast: bool, monkeypatch: pytest.MonkeyPatch,
          ) -> tuple[float, dict, int]:
    """One DPO step of the bf16 tiny model with LoRA on every linear layer through kllama's trainer (which autocasts
    the branches under bf16; `branches_autocast=False` leaves PEFT's fp32 branches, as before that change): its
    loss, LoRA gradients and number of activation-sized casts."""
    from kllama.config import build_config
    from kllama.model.adapters import attach_lora, resolve_lora_spec
    from kllama.model.load import load_model
    from kllama.train import trainer as trainer_module

    config = build_config({"model_name_or_path": str(model_dir), "output_dir": str(tmp), "stage": "dpo",
                           "dataset": "dpo_en_demo", "template": "deepseek", "cutoff_len": 64, "max_samples": 4,
                           "lora_rank": 4, "lora_target": "all", "seed": 3, "max_steps": 1, "bf16": True,
                           "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                           "logging_steps": 1, "disable_tqdm": True, "dataloader_num_workers": 0})
    loaded = load_model(config, "train")
    base = loaded.model.to(dtype=torch.bfloat16)
    model = attach_lora(base, resolve_lora_spec(base, ["all"], 4, None, 0.0), seed=3)
    with torch.no_grad():  # non-zero B: the adapters take part in the forward
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(len(name)))
    with monkeypatch.context() as patch:
        if not branches_autocast:
            patch.setattr(trainer_module, "autocast_lora_branches", lambda *args, **kwargs: [])
        return _train_one_step(config, loaded, base, model, tmp)


def _train_one_step(config, loaded, base, model, tmp: Path) -> tuple[float, dict, int]:  # noqa: ANN001
    from kllama.data import PairwiseCollator, build_dataset, get_template
    from kllama.train.run import build_training_arguments, preference_settings
    from kllama.train.trainer import KllamaTrainer

    bundle = build_dataset(config.data, loaded.tokenizer, get_template("deepseek", loaded.tokenizer), stage="dpo",
                           seed=3)
    args = build_training_arguments(config, has_eval=False, use_cpu=loaded.device.type == "cpu", plan=None)
    args.train_sampling_strategy = "sequential"
    capture = GradCapture()
    trainer = KllamaTrainer(model=model, args=args, train_dataset=bundle.train,
                            data_collator=PairwiseCollator(loaded.tokenizer.pad_token_id),
                            processing_class=loaded.tokenizer, callbacks=[capture],
                            settings=preference_settings(config, base.config))
    counter = activation_casts(2 * 16 * base.config.hidden_size)  # two rows of >= 16 tokens, full width
    with counter:
        trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, capture.grads, counter.count


def test_a_bf16_dpo_step_with_autocast_branches(tiny_model_dir, tmp_path, monkeypatch):
    """kllama's trainer under bf16: the same step as with PEFT's fp32 branches to bf16 rounding (the branch matmuls
    now round to bf16), with fewer activation casts."""
    model_dir = tiny_model_dir("deepseek_v2")
    loss_fp32, grads_fp32, casts_fp32 = _step(model_dir, tmp_path / "fp32", False, monkeypatch)
    loss_bf16, grads_bf16, casts_bf16 = _step(model_dir, tmp_path / "bf16", True, monkeypatch)
    assert abs(loss_bf16 - loss_fp32) < 0.02 * abs(loss_fp32)
    assert grads_fp32 is not None and grads_bf16 is not None and grads_fp32.keys() == grads_bf16.keys()
    total_fp32 = torch.cat([g.flatten() for g in grads_fp32.values()])
    total_bf16 = torch.cat([grads_bf16[n].flatten() for n in grads_fp32])
    assert torch.isfinite(total_bf16).all()
    cosine = torch.nn.functional.cosine_similarity(total_fp32, total_bf16, dim=0)
    assert cosine > 0.99, cosine
    assert casts_bf16 < casts_fp32, (casts_bf16, casts_fp32)
