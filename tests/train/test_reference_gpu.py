"""Issue #11 on the GPU: the reference precompute's largest pass -- 16 pairs padded to 2,048 tokens, 32 x 2,048 =
65,536 tokens with V2-Lite's attention (16 heads, MLA head dims 192 / 128), right padding as the collator does it --
gives the same finite log-probs as one pair a pass. On the H200 box (torch 2.11, bf16, sdpa) the seed YAML's
precompute made exactly such a pass and training stopped with a NaN loss at the first step holding its pairs.

Run on the GPU box: `.venv/bin/pytest -q -s -m gpu tests/train/test_reference_gpu.py` (`-s` shows whether the
packed pass had to run again in smaller passes: a line `reference log-probs: a pass of 16 pairs ...`).
"""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# V2-Lite's attention and hidden shapes (benchmarks/common.py FULL_SHAPES), two layers, few small experts
V2LITE_ATTENTION = {
    "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "num_hidden_layers": 2, "first_k_dense_replace": 1, "intermediate_size": 2048, "moe_intermediate_size": 256,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "max_position_embeddings": 4096,
}


def _pairs(vocab: int, n: int = 16, longest: int = 2048, seed: int = 0):
    """`n` tokenized pairs, the longest `longest` tokens, the others spread down to 3/4 of it (as the precompute's
    first pass of the user_path data); the first fifth of each sequence is the prompt (no labels)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows: dict[str, list[list[int]]] = {k: [] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                         "rejected_labels")}
    for i in range(n):
        length = longest if i == 0 else rng.randint(3 * longest // 4, longest)
        for side, size in (("chosen", length), ("rejected", rng.randint(length // 2, length))):
            ids = [rng.randrange(10, vocab) for _ in range(size)]
            rows[f"{side}_input_ids"].append(ids)
            rows[f"{side}_labels"].append([-100] * (size // 5) + ids[size // 5:])
    return Dataset.from_dict(rows)


@pytest.mark.gpu_exclusive  # a 65,536-token pass
def test_the_largest_precompute_pass_equals_one_pair_a_pass(tmp_path, capsys):
    from kllama.config import build_config
    from kllama.data import PairwiseCollator
    from kllama.model.adapters import attach_lora, resolve_lora_spec
    from kllama.model.load import load_model
    from kllama.model.tiny import write_tiny_model
    from kllama.train.reference import attach_reference_logps

    model_dir = write_tiny_model(tmp_path / "model", "deepseek_v2", dtype=torch.bfloat16, **V2LITE_ATTENTION)
    config = build_config({
        "model_name_or_path": str(model_dir), "output_dir": str(tmp_path / "out"), "stage": "dpo",
        "dataset": "dpo_en_demo", "template": "deepseek", "bf16": True, "use_kt": True, "expert_placement": "stream",
        "lora_rank": 8, "precompute_ref_log_probs": True,
    })
    loaded = load_model(config, "train")
    f = config.finetuning
    model = attach_lora(loaded.model, resolve_lora_spec(loaded.model, f.lora_target, f.lora_rank, None, 0.0), seed=0)
    pairs = _pairs(loaded.model.config.vocab_size)
    collate = PairwiseCollator(loaded.tokenizer.pad_token_id, pad_to_multiple_of=8)
    packed = attach_reference_logps(model, pairs, collate, None, tmp_path / "packed", batch_size=1,
                                    device=loaded.device, token_budget=65536)
    assert "16 pairs in 1 passes of up to 65,536 tokens" in capsys.readouterr().out
    alone = attach_reference_logps(model, pairs, collate, None, tmp_path / "alone", batch_size=1,
                                   device=loaded.device)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        got = torch.tensor(list(packed[column]), dtype=torch.float64)
        want = torch.tensor(list(alone[column]), dtype=torch.float64)
        assert torch.isfinite(got).all() and torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=5e-3, atol=1.0, msg=column)  # bf16 sums of ~1,500 tokens
