"""`router_aux_loss_coef: null` means the model config's coefficient (as TRL): on a tiny qwen3_moe the loss gains
exactly `config.router_aux_loss_coef x` the Switch load-balancing loss, computed here by hand from the routers'
logits; families without a coefficient (DeepSeek-V2) add nothing."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kllama.config import build_config
from kllama.data import PairwiseCollator, build_dataset, get_template
from kllama.model.adapters import attach_lora, resolve_lora_spec
from kllama.model.load import load_model
from kllama.train.run import build_training_arguments, preference_settings
from kllama.train.trainer import KllamaTrainer


def hand_aux_loss(router_logits: list[torch.Tensor], mask: torch.Tensor, experts: int, top_k: int) -> torch.Tensor:
    """E x sum_e f_e P_e over every layer's non-padding tokens: f_e = share of the top-k picks that went to expert e
    (per pick slot), P_e = mean router probability of expert e (Fedus et al., Switch Transformer, eq. 4)."""
    keep = mask.reshape(-1).bool()  # [T]
    f = torch.zeros(experts, dtype=torch.float64)
    p = torch.zeros(experts, dtype=torch.float64)
    for logits in router_logits:  # [T, E] per layer
        probs = logits.double().softmax(-1)[keep]
        picks = probs.topk(top_k, dim=-1).indices  # [t, k]
        f += torch.bincount(picks.reshape(-1), minlength=experts).double() / keep.sum()
        p += probs.sum(0) / keep.sum()
    layers = len(router_logits)  # every layer routes the same tokens: the mean over all is the mean of the layers'
    return experts * ((f / layers) * (p / layers)).sum()


def _config(model_dir, tmp_path, **extra):
    return build_config({
        "model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "out"), "stage": "dpo",
        "dataset": "dpo_en_demo", "template": "qwen", "cutoff_len": 48, "max_samples": 4, "lora_rank": 4,
        "seed": 0, "disable_tqdm": True, **extra,
    })


def test_default_router_aux_loss_is_the_config_coefficient_times_the_hand_computed_loss(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir("qwen3_moe"), tmp_path)
    loaded = load_model(config, "train")
    hf = loaded.model.config
    settings = preference_settings(config, hf)
    assert config.model.router_aux_loss_coef is None
    assert settings.router_aux_loss_coef == hf.router_aux_loss_coef == 0.001
    bundle = build_dataset(config.data, loaded.tokenizer, get_template("qwen", loaded.tokenizer), stage="dpo", seed=0,
                           cache_dir=None)
    model = attach_lora(loaded.model, resolve_lora_spec(loaded.model, ["all"], 4, None, 0.0), seed=0)
    batch = PairwiseCollator(loaded.tokenizer.pad_token_id)([bundle.train[i] for i in range(2)])
    batch = {k: v.to(loaded.device) for k, v in batch.items()}
    args = build_training_arguments(config, has_eval=False, use_cpu=loaded.device.type == "cpu")
    losses = {}
    for name, s in (("default", settings), ("off", replace(settings, router_aux_loss_coef=0.0))):
        trainer = KllamaTrainer(model=model, args=args, train_dataset=bundle.train, settings=s,
                                processing_class=loaded.tokenizer)
        model.train()
        with torch.no_grad():
            losses[name] = trainer.compute_loss(model, batch).double().item()

    captured: list[torch.Tensor] = []
    routers = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeTopKRouter"]
    hooks = [r.register_forward_hook(lambda _m, _i, out: captured.append(out[0].detach().cpu())) for r in routers]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    assert len(captured) == hf.num_hidden_layers
    aux = hand_aux_loss(captured, batch["attention_mask"].cpu(), hf.num_experts, hf.num_experts_per_tok).item()
    assert aux > 0.5  # ~1 for a balanced router
    assert losses["default"] - losses["off"] == pytest.approx(0.001 * aux, rel=1e-5)


def test_no_coefficient_in_the_config_means_no_aux_loss(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    config = _config(tiny_model_dir("deepseek_v2"), tmp_path, template="deepseek")
    hf = AutoConfig.from_pretrained(tiny_model_dir("deepseek_v2"))
    assert preference_settings(config, hf).router_aux_loss_coef is None
    explicit = _config(tiny_model_dir("qwen3_moe"), tmp_path, router_aux_loss_coef=0.0)
    assert not preference_settings(explicit, AutoConfig.from_pretrained(tiny_model_dir("qwen3_moe"))).router_aux_loss_coef


def test_micro_batching_stays_on_with_the_default_coefficient(tiny_model_dir, tmp_path, capsys):
    # The config's own coefficient (Qwen3-MoE carries one) keeps micro-batching on: the aux loss is averaged over a
    # step's passes as accumulation averages it over micro-batches; the run logs it.
    import json

    from kllama.cli import main

    common = [f"model_name_or_path={tiny_model_dir('qwen3_moe')}", "stage=dpo", "dataset=dpo_en_demo",
              "template=qwen", "cutoff_len=48", "max_samples=4", "per_device_train_batch_size=2",
              "gradient_accumulation_steps=2", "max_steps=1", "use_kt=true", "expert_placement=cpu", "lora_rank=4",
              "disable_tqdm=true", "save_steps=100", "logging_steps=1"]
    assert main(["train", *common, f"output_dir={tmp_path / 'a'}"]) == 0
    assert "micro-batching: 2 x 2 accumulation -> each step's 4 pairs" in capsys.readouterr().out
    history = json.loads((tmp_path / "a" / "trainer_state.json").read_text())["log_history"]
    assert next(h for h in history if "loss" in h)["router_aux_loss"] > 0
