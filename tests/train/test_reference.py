"""`precompute_ref_log_probs`: the cached reference log-probs equal the in-step reference, whatever the batch size
of the precompute pass (`precompute_ref_batch_size`) or its token budget, and a second run loads them from the
cache; they are always finite (a failing pass runs again smaller, a pair non-finite alone is refused, a cache with
non-finite values is computed again)."""
from __future__ import annotations

import pytest
import torch


def test_precomputed_reference_matches_in_step_reference_for_any_batch_size(tiny_model_dir, tmp_path, capsys):
    from kllama.config import build_config
    from kllama.data import PairwiseCollator, build_dataset, get_template
    from kllama.model.adapters import adapters_disabled, attach_lora, resolve_lora_spec
    from kllama.model.load import load_model
    from kllama.train.reference import attach_reference_logps
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
    device = loaded.device  # where the run put the model (the GPU when there is one)
    one = attach_reference_logps(model, bundle.train, collate, None, tmp_path / "a", batch_size=1,
                                 device=device)
    five = attach_reference_logps(model, bundle.train, collate, None, tmp_path / "b", batch_size=5,
                                  device=device)
    # token-budget passes (host-held experts): rows longest first, 2-3 pairs a pass at cutoff 48, results in row order
    budgeted = attach_reference_logps(model, bundle.train, collate, None, tmp_path / "c", batch_size=1,
                                      device=device, token_budget=2 * 2 * 56)
    assert "7 pairs in" in capsys.readouterr().out
    # packed (padding-free) passes, budget in real tokens, and packed fixed batches
    packed_collate = PairwiseCollator(loaded.tokenizer.pad_token_id, packed=True)
    packed = attach_reference_logps(model, bundle.train, packed_collate, None, tmp_path / "d",
                                    batch_size=1, device=device, token_budget=200, packed=True)
    out = capsys.readouterr().out
    passes = int(out.split("7 pairs in ")[1].split(" passes of up to 200 real (packed) tokens")[0])
    assert 2 < passes < 7  # several pairs share a pass, none over 200 tokens (a pair is 60-100 at cutoff 48)
    packed_five = attach_reference_logps(model, bundle.train, packed_collate, None, tmp_path / "e",
                                         batch_size=5, device=device)

    rows = [bundle.train[i] for i in range(len(bundle.train))]
    batch = {k: v.to(device) for k, v in collate(rows).items()}
    with torch.no_grad(), adapters_disabled(model):
        sums = policy_logps(model, batch, PreferenceSettings(stage="dpo", ld_alpha=None))[0].cpu()
    with torch.no_grad():
        policy = policy_logps(model, batch, PreferenceSettings(stage="dpo", ld_alpha=None))[0].cpu()
    half = len(rows)
    assert sums.shape[0] == 2 * half
    assert not torch.allclose(policy, sums, atol=1e-3)  # the reference really is the model with adapters off
    for cached in (one, five, budgeted, packed, packed_five):
        torch.testing.assert_close(torch.tensor(cached["ref_chosen_logps"], dtype=torch.float64), sums[:half], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.tensor(cached["ref_rejected_logps"], dtype=torch.float64), sums[half:], rtol=1e-5, atol=1e-4)

    cache_file = next((tmp_path / "a" / "reference_logps").glob("*.pt"))
    written = cache_file.stat().st_mtime_ns
    capsys.readouterr()
    again = attach_reference_logps(model, bundle.train, collate, None, tmp_path / "a", batch_size=3,
                                   device=device)
    assert "loaded from cache" in capsys.readouterr().out
    assert cache_file.stat().st_mtime_ns == written
    assert again["ref_chosen_logps"] == one["ref_chosen_logps"]


def _tiny_dpo(tiny_model_dir, tmp_path, rows: int = 7):
    """A tiny deepseek_v2 with a non-zero LoRA, its dpo_en_demo pairs (cutoff 48), and their collator."""
    from kllama.config import build_config
    from kllama.data import PairwiseCollator, build_dataset, get_template
    from kllama.model.adapters import attach_lora, resolve_lora_spec
    from kllama.model.load import load_model

    config = build_config({
        "model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": str(tmp_path / "out"),
        "stage": "dpo", "dataset": "dpo_en_demo", "template": "deepseek", "cutoff_len": 48, "max_samples": rows,
        "use_kt": True, "expert_placement": "cpu", "lora_rank": 4, "precompute_ref_log_probs": True,
    })
    loaded = load_model(config, "train")
    bundle = build_dataset(config.data, loaded.tokenizer, get_template("deepseek", loaded.tokenizer), stage="dpo",
                           seed=0, cache_dir=None)
    f = config.finetuning
    model = attach_lora(loaded.model, resolve_lora_spec(loaded.model, f.lora_target, f.lora_rank, None, 0.0), seed=0)
    collate = PairwiseCollator(loaded.tokenizer.pad_token_id, pad_to_multiple_of=8)
    return model, bundle.train, collate, loaded.device


def _columns(dataset) -> torch.Tensor:
    return torch.tensor([list(dataset["ref_chosen_logps"]), list(dataset["ref_rejected_logps"])], dtype=torch.float64)


def test_a_pass_whose_size_fails_runs_again_in_smaller_passes(tiny_model_dir, tmp_path, capsys):
    """Issue #11: on the H200 the precompute's one 32 x 2,048-token pass returned NaN for pairs that smaller passes
    computed fine, and the NaN reached the cache and stopped training at step 7. A CPU has no such kernel, so a hook
    on the first attention layer stands in for it (NaN output for passes over one pair's tokens): the values must
    still be finite and equal to one pair a pass."""
    from kllama.train.reference import attach_reference_logps

    model, rows, collate, device = _tiny_dpo(tiny_model_dir, tmp_path)
    one = attach_reference_logps(model, rows, collate, None, tmp_path / "one", batch_size=1, device=device)

    def fails_above_one_pair(module, args, output):  # noqa: ANN001, ANN202
        out = output[0]  # [B, T, H]
        if out.shape[0] > 2:
            return (torch.full_like(out, float("nan")), *output[1:])
        return None

    attention = next(m for name, m in model.named_modules() if name.endswith("layers.0.self_attn"))
    handle = attention.register_forward_hook(fails_above_one_pair)
    try:
        capsys.readouterr()
        packed = attach_reference_logps(model, rows, collate, None, tmp_path / "packed", batch_size=1,
                                        device=device, token_budget=4 * 56)
    finally:
        handle.remove()
    out = capsys.readouterr().out
    assert "gave non-finite log-probs for" in out and "running it again as passes of" in out
    torch.testing.assert_close(_columns(packed), _columns(one), rtol=1e-6, atol=1e-6)
    cached = torch.load(next((tmp_path / "packed" / "reference_logps").glob("*.pt")), weights_only=True)
    assert all(torch.isfinite(torch.tensor(cached["chosen"] + cached["rejected"])))


def test_a_pair_non_finite_alone_is_refused_naming_it_and_nothing_is_cached(tiny_model_dir, tmp_path):
    from kllama.errors import KllamaError
    from kllama.train.reference import attach_reference_logps

    model, rows, collate, device = _tiny_dpo(tiny_model_dir, tmp_path)
    # a token only pair 3's chosen response has, with a NaN embedding: that pair is NaN in any pass, alone too
    others = {t for i in range(len(rows)) for key in ("chosen_input_ids", "rejected_input_ids")
              for t in rows[i][key] if (i, key) != (3, "chosen_input_ids")}
    token = next(t for t in rows[3]["chosen_input_ids"] if t not in others)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    for batching in ({"batch_size": 3}, {"batch_size": 1, "token_budget": 4 * 56}):
        with pytest.raises(KllamaError) as error:
            attach_reference_logps(model, rows, collate, None, tmp_path / "c", device=device, **batching)
        message = str(error.value)
        assert "train pair 3 " in message and "not finite" in message and "NaN/inf values in the model" in message
        assert not (tmp_path / "c" / "reference_logps").exists()


def test_a_cache_holding_non_finite_values_is_computed_again(tiny_model_dir, tmp_path, capsys):
    from kllama.train.reference import attach_reference_logps

    model, rows, collate, device = _tiny_dpo(tiny_model_dir, tmp_path, rows=4)
    first = attach_reference_logps(model, rows, collate, None, tmp_path, batch_size=2, device=device)
    cache_file = next((tmp_path / "reference_logps").glob("*.pt"))
    saved = torch.load(cache_file, weights_only=True)
    saved["rejected"][2] = float("nan")  # as a run before kllama checked the values could have written it
    torch.save(saved, cache_file)
    capsys.readouterr()
    again = attach_reference_logps(model, rows, collate, None, tmp_path, batch_size=2, device=device)
    assert "holds non-finite values (pair 2); computing them again" in capsys.readouterr().out
    torch.testing.assert_close(_columns(again), _columns(first))
    assert torch.isfinite(torch.tensor(torch.load(cache_file, weights_only=True)["rejected"])).all()


def test_the_cache_is_per_weights_expert_dtype_and_checkpoint_files(tiny_model_dir, tmp_path, capsys):
    """The H200 box's fp8 run loaded the reference log-probs its int8 run had cached (the key named the model
    path only). The key now holds `weights_identity`: another `expert_dtype` or a rewritten checkpoint file at the
    same path computes them again; the same weights load them."""
    import os

    from kllama.train.reference import attach_reference_logps, weights_identity

    model, rows, collate, device = _tiny_dpo(tiny_model_dir, tmp_path, rows=3)
    model_dir = tiny_model_dir("deepseek_v2")
    bf16, int8 = weights_identity(model_dir, "bf16"), weights_identity(model_dir, "int8")
    assert any(name.endswith(".safetensors") for name, _, _ in bf16["files"])

    def attach(weights: dict) -> str:
        capsys.readouterr()
        attach_reference_logps(model, rows, collate, None, tmp_path, batch_size=3, device=device,
                               weights=weights)
        return capsys.readouterr().out

    assert "loaded from cache" not in attach(bf16)
    assert "loaded from cache" in attach(weights_identity(model_dir, "bf16"))
    assert "loaded from cache" not in attach(int8)
    assert len(list((tmp_path / "reference_logps").glob("*.pt"))) == 2
    weights_file = next(model_dir.glob("*.safetensors"))
    stat = weights_file.stat()
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place
    try:
        assert "loaded from cache" not in attach(weights_identity(model_dir, "bf16"))
    finally:
        os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
