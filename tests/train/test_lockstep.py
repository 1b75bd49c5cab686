"""The DPO reference computed in lock-step with the policy's forward: same numbers as its own pass, same step."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from train_helpers import GradCapture

from kllama.train.lockstep import LockstepReference, lockstep_for_run


def _model(model_dir: Path, tmp: Path, **settings):  # noqa: ANN202
    settings = {"template": "deepseek", **settings}
    from kllama.config import build_config
    from kllama.model.adapters import attach_lora, resolve_lora_spec
    from kllama.model.load import load_model

    config = build_config({"model_name_or_path": str(model_dir), "output_dir": str(tmp), "stage": "dpo",
                           "dataset": "dpo_en_demo", "cutoff_len": 64, "max_samples": 8,
                           "use_kt": True, "expert_placement": "cpu", "lora_rank": 4, "seed": 3, "max_steps": 1,
                           "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "logging_steps": 1,
                           "disable_tqdm": True, **settings})
    loaded = load_model(config, "train")
    f = config.finetuning
    model = attach_lora(loaded.model, resolve_lora_spec(loaded.model, f.lora_target, f.lora_rank, None, 0.0), seed=3)
    with torch.no_grad():  # non-zero B: the policy differs from the reference in every adapted module
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(len(name)))
    return config, loaded, model


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_reference_hidden_states_equal_a_pass_of_their_own(arch, tiny_model_dir, tmp_path):
    from kllama.model.adapters import adapters_disabled
    from kllama.train.trainer import causal_lm_of

    _, loaded, model = _model(tiny_model_dir(arch), tmp_path)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.train()
    lm = causal_lm_of(model)
    lockstep = LockstepReference.of(lm)
    assert lockstep is not None
    ids = torch.randint(3, lm.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0)).to(loaded.device)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # padding in one row: the mask reaches the reference's layers as it reaches the policy's
    with lockstep.following() as reference:
        policy = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    got = reference()
    policy.float().square().mean().backward()  # the recompute of checkpointed layers runs without the reference
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in lockstep.layers)
    with torch.no_grad(), adapters_disabled(model):
        want = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        again = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert not got.requires_grad and not torch.equal(want, policy.detach())  # the adapters matter here
    torch.testing.assert_close(got, want, rtol=0, atol=0) if torch.equal(want, again) else \
        torch.testing.assert_close(got, want)
    # adapters are back on and trainable after the block
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.grad is not None for n, p in model.named_parameters() if "lora_" in n) > 0


def _first_step(model_dir: Path, tmp: Path, lockstep: bool, budget: int | None, **settings):  # noqa: ANN202
    from kllama.data import PairwiseCollator, build_dataset, get_template
    from kllama.train.micro_batching import BatchPlan, ChunkedCollator, LengthGroupedRows, row_lengths
    from kllama.train.run import build_training_arguments, preference_settings
    from kllama.train.trainer import KllamaTrainer, causal_lm_of

    config, loaded, model = _model(model_dir, tmp, **settings)
    bundle = build_dataset(config.data, loaded.tokenizer, get_template(config.data.template, loaded.tokenizer),
                           stage="dpo", seed=3)
    packed = bool(config.training.padding_free)
    collate = PairwiseCollator(loaded.tokenizer.pad_token_id, packed=packed,
                               share_prompts=config.finetuning.prefix_sharing)
    rows = LengthGroupedRows(bundle.train, row_lengths(bundle.train, "dpo"), 4, seed=3)
    plan = None
    if budget is not None:
        plan = BatchPlan(1, 4, budget, 2, "pairs", packed)
        collate = ChunkedCollator(collate, "dpo", budget, packed, bool(config.finetuning.prefix_sharing))
    args = build_training_arguments(config, has_eval=False, use_cpu=True, plan=plan)
    args.train_sampling_strategy = "sequential"
    capture = GradCapture()
    trainer = KllamaTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                            processing_class=loaded.tokenizer, callbacks=[capture],
                            settings=preference_settings(config, loaded.model.config),
                            lockstep=LockstepReference.of(causal_lm_of(model)) if lockstep else None)
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, capture.grads


@pytest.mark.parametrize("arch,budget,settings", [
    ("deepseek_v2", None, {}),                                         # the user's micro-steps
    ("deepseek_v2", 300, {}),                                          # merged, in passes of unequal size
    ("deepseek_v2", 10**6, {"disable_gradient_checkpointing": True}),  # one pass, activations kept
    ("deepseek_v2", 10**6, {"ld_alpha": 0.5}),                        # the reference keeps plain sums
    ("qwen3_moe", 300, {"template": "qwen"}),                         # router aux loss from the policy's logits only
    ("deepseek_v2", 300, {"padding_free": True, "ld_alpha": 0.5}),    # packed passes: the reference's too
    ("qwen3_moe", 300, {"template": "qwen", "padding_free": True}),   # packed, router aux loss
    ("deepseek_v2", 300, {"padding_free": True, "prefix_sharing": True}),  # packed, each pair's prompt once
], ids=["accumulated", "passes", "no-checkpointing", "ld-dpo", "router-aux", "packed", "packed-router-aux",
        "prefix-sharing"])
def test_a_dpo_step_with_the_lockstep_reference_equals_the_separate_pass(arch, budget, settings, tiny_model_dir,
                                                                          tmp_path):
    model_dir = tiny_model_dir(arch)
    loss_a, grads_a = _first_step(model_dir, tmp_path / "a", False, budget, **settings)
    loss_b, grads_b = _first_step(model_dir, tmp_path / "b", True, budget, **settings)
    if arch == "qwen3_moe":  # the config's router aux coefficient is on, and its part of the loss is not small
        no_aux, _ = _first_step(model_dir, tmp_path / "c", True, budget, **settings, router_aux_loss_coef=0.0)
        assert abs(loss_b - no_aux) > 1e-4
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and any(".experts." in k for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_runs_that_keep_the_reference_pass(tiny_model_dir, tmp_path):
    from kllama.train.trainer import causal_lm_of

    _, _, model = _model(tiny_model_dir("deepseek_v2"), tmp_path)
    lm = causal_lm_of(model)
    base = {"stage": "dpo", "reference_free": False, "precomputed": False, "starting_adapter": False,
            "streamed_layers": 3}
    assert isinstance(lockstep_for_run(lm, **base), LockstepReference)
    for change in ({"stage": "sft"}, {"reference_free": True}, {"precomputed": True}, {"starting_adapter": True},
                   {"streamed_layers": 0}):
        assert lockstep_for_run(lm, **{**base, **change}) is None, change
    # an adapter outside the decoder layers (here: an adapted head): the reference differs there too
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = next(m for m in lm.model.layers[0].modules() if isinstance(m, BaseTunerLayer))
    decoder = torch.nn.Module()
    decoder.layers, decoder.norm = torch.nn.ModuleList(lm.model.layers[1:]), lm.model.norm
    plain, tuned = torch.nn.Module(), torch.nn.Module()
    plain.model, plain.lm_head = decoder, torch.nn.Linear(2, 2)
    tuned.model, tuned.lm_head = decoder, adapted
    assert LockstepReference.of(plain) is not None and LockstepReference.of(tuned) is None


def test_trainer_refuses_a_lockstep_reference_it_cannot_honour(tiny_model_dir, tmp_path):
    from kllama.train.trainer import KllamaTrainer, PreferenceSettings, causal_lm_of

    _, _, model = _model(tiny_model_dir("deepseek_v2"), tmp_path)
    lockstep = LockstepReference.of(causal_lm_of(model))
    with pytest.raises(ValueError, match="starting-adapter"):
        KllamaTrainer(model=model, settings=PreferenceSettings(), lockstep=lockstep,
                      reference_context=lambda: contextlib.nullcontext())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_streamed_run_uses_the_lockstep_reference_and_trains_as_a_resident_run(tiny_model_dir, tmp_path):
    import json

    from train_helpers import train_tiny_dpo

    from kllama.train.lockstep import LOCKSTEP_LINE

    model_dir = tiny_model_dir("deepseek_v2")
    # 4 pairs: every step is an epoch of the same 4 pairs in both runs. With more rows the runs train on different
    # steps: the streamed run merges each step's pairs and groups rows into steps by length (LengthGroupedRows), the
    # resident run keeps 1 x 4 and the Trainer's random sampler; with 12 pairs steps 2-3 differ by up to 0.004 on
    # the CPU as on the GPU (experts on the CPU, merged vs micro_batch_tokens=0), bit for bit the GPU's losses.
    streamed = train_tiny_dpo(tmp_path / "streamed", model_dir, "max_samples=4")  # lock-step reference, merged
    resident = train_tiny_dpo(tmp_path / "resident", model_dir, "max_samples=4", "expert_placement=gpu")  # 1 x 4
    assert LOCKSTEP_LINE in streamed and LOCKSTEP_LINE not in resident
    assert "each step's 4 pairs in as few passes" in streamed and "kept 1 x 4 accumulation" in resident
    # streamed passes are packed and share each pair's prompt by default; resident ones are padded and do not
    sharing = "prefix sharing: each packed pair's prompt runs once"
    assert sharing in streamed and sharing not in resident

    def losses(out: Path) -> list[float]:
        return [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]

    # step 1 starts at the reference (B = 0: log 2 whatever the rows); steps 2 and 3 compare policies that moved away
    # from it (by ~0.025 and ~0.04 here; a reference that followed the policy would stay at log 2). The adapters are
    # not compared element-wise: merged passes and accumulation differ by float rounding, which Adam turns into +-lr
    # for gradients near zero (the losses barely move: 1.2e-7 between merged and 1 x 4 on the CPU).
    first, *later = losses(tmp_path / "streamed")
    assert [first, *later] == pytest.approx(losses(tmp_path / "resident"), abs=1e-4)
    assert any(abs(loss - first) > 1e-3 for loss in later)
