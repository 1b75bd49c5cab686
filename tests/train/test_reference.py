"""`precompute_ref_log_probs`: the cached reference log-probs equal the in-step reference, whatever the batch size
of the precompute pass (`precompute_ref_batch_size`) or its token budget, and a second run loads them from the
cache."""
from __future__ import annotations

import torch


def test_precomputed_reference_matches_in_step_reference_for_any_batch_size(tiny_model_dir, tmp_path, capsys):
    from kllama.config import build_config
    from kllama.data import PairwiseCollator, build_dataset, get_template
    from kllama.model.adapters import adapters_disabled, attach_lora, resolve_lora_spec
    from kllama.model.load import load_model
    from kllama.train.reference import attach_reference_logps
    from kllama.train.run import preference_settings
    from kllama.train.trainer import PreferenceSettings, policy_logps

    config = build_config({
        "model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": str(tmp_path / "out"),
        "stage": "dpo", "dataset": "dpo_en_demo", "template": "deepseek", "cutoff_len": 48, "max_samples": 7,
        "use_kt": True, "expert_placement": "cpu", "lora_rank": 4, "precompute_ref_log_probs": True,
        "precompute_ref_batch_size": 5,
    })
    loaded = load_model(config, "train")
    bundle = build_dataset(config.data, loaded.tokenizer, get_template("deepseek", loaded.tokenizer), stage="dpo",
                           seed=0, cache_dir=None)
    f = config.finetuning
    model = attach_lora(loaded.model, resolve_lora_spec(loaded.model, f.lora_target, f.lora_rank, None, 0.0), seed=0)
    with torch.no_grad():  # a non-zero adapter, so "adapters off" is a different model from the policy
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator(device=p.device).manual_seed(len(name)))
    collate = PairwiseCollator(loaded.tokenizer.pad_token_id, pad_to_multiple_of=8)
    settings = preference_settings(config)
    device = loaded.device  # where the run put the model (the GPU when there is one)
    one = attach_reference_logps(model, bundle.train, collate, settings, None, tmp_path / "a", batch_size=1,
                                 device=device)
    five = attach_reference_logps(model, bundle.train, collate, settings, None, tmp_path / "b", batch_size=5,
                                  device=device)
    # token-budget passes (host-held experts): rows longest first, 2-3 pairs a pass at cutoff 48, results in row order
    budgeted = attach_reference_logps(model, bundle.train, collate, settings, None, tmp_path / "c", batch_size=1,
                                      device=device, token_budget=2 * 2 * 56)
    assert "7 pairs in" in capsys.readouterr().out

    rows = [bundle.train[i] for i in range(len(bundle.train))]
    batch = {k: v.to(device) for k, v in collate(rows).items()}
    with torch.no_grad(), adapters_disabled(model):
        sums = policy_logps(model, batch, PreferenceSettings(stage="dpo", ld_alpha=None))[0].cpu()
    with torch.no_grad():
        policy = policy_logps(model, batch, PreferenceSettings(stage="dpo", ld_alpha=None))[0].cpu()
    half = len(rows)
    assert sums.shape[0] == 2 * half
    assert not torch.allclose(policy, sums, atol=1e-3)  # the reference really is the model with adapters off
    for cached in (one, five, budgeted):
        torch.testing.assert_close(torch.tensor(cached["ref_chosen_logps"], dtype=torch.float64), sums[:half], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.tensor(cached["ref_rejected_logps"], dtype=torch.float64), sums[half:], rtol=1e-5, atol=1e-4)

    cache_file = next((tmp_path / "a" / "reference_logps").glob("*.pt"))
    written = cache_file.stat().st_mtime_ns
    capsys.readouterr()
    again = attach_reference_logps(model, bundle.train, collate, settings, None, tmp_path / "a", batch_size=3,
                                   device=device)
    assert "loaded from cache" in capsys.readouterr().out
    assert cache_file.stat().st_mtime_ns == written
    assert again["ref_chosen_logps"] == one["ref_chosen_logps"]
