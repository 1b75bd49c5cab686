"""Padding-free ("packed") passes: transformers' packed attention (pinned: we rely on it), the packed batch layout,
per-sequence log-probs and router aux loss equal to the padded batch's, pass budgets in real tokens, and when a run
packs. Whole training steps packed vs padded: tests/train/test_micro_batching.py, test_lockstep.py,
test_reference.py."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_helpers import OpCounter

from kllama.data.collate import IGNORE_INDEX, batch_sequences, pack_batch, pad_batch, real_tokens
from kllama.train.logprobs import sequence_logps
from kllama.train.micro_batching import (
    BatchPlan,
    StepShape,
    chunk_rows,
    describe,
    largest_pass_tokens,
    layout_phrase,
    pass_tokens,
    passes_per_step,
    reference_pass_budget,
)
from kllama.train.packing import padding_free_for


def _loaded(model_dir: Path, tmp: Path, **settings):  # noqa: ANN202
    from kllama.config import build_config
    from kllama.model.load import load_model

    config = build_config({"model_name_or_path": str(model_dir), "output_dir": str(tmp), "stage": "dpo",
                           "dataset": "dpo_en_demo", "template": "deepseek", "use_kt": True,
                           "expert_placement": "cpu", **settings})
    return load_model(config, "train")


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_transformers_masks_packed_sequences_from_position_ids(arch, tiny_model_dir, tmp_path):
    """Two sequences in one row, position_ids restarting at 0, no attention mask and no cache (`use_cache=False`,
    as `policy_logps` runs) give each sequence's logits run alone (transformers' `find_packed_sequence_indices`); the
    same row without position_ids does not (the check can fail)."""
    lm = _loaded(tiny_model_dir(arch), tmp_path).model
    device = next(lm.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(5, 100, (1, n), generator=generator).to(device) for n in (7, 12))
    row = torch.cat([first, second], 1)  # [1, 19]
    positions = torch.cat([torch.arange(7), torch.arange(12)])[None].to(device)
    with torch.no_grad():
        alone = torch.cat([lm(input_ids=first, use_cache=False).logits,
                           lm(input_ids=second, use_cache=False).logits], 1)  # [1, 19, V]
        packed = lm(input_ids=row, position_ids=positions, use_cache=False).logits
        unmasked = lm(input_ids=row, use_cache=False).logits
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked[:, 7:], alone[:, 7:], atol=1e-3)


def test_pack_batch_lays_out_sequences_without_padding():
    ids, labels = [[5, 6, 7], [8, 9]], [[5, 6, 7], [IGNORE_INDEX, 9]]
    batch = pack_batch(ids, labels)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["sequence_index"].tolist() == [[0, 0, 0, 1, 1]]
    # a sequence's first label is never a target: the last token of the one before must not predict it
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert batch["sequence_bounds"] == (0, 3, 5)
    assert "attention_mask" not in batch
    assert (real_tokens(batch), batch_sequences(batch)) == (5, 2)
    padded = pad_batch(ids, labels, 0, 8)
    assert (real_tokens(padded), batch_sequences(padded)) == (5, 2)


@pytest.mark.parametrize("ld_alpha", [None, 0.3])
def test_packed_sequence_logps_equal_the_padded_rows(ld_alpha):
    """Per-sequence sums and counts (LD-DPO weights included) of a packed row equal those of the same sequences
    padded, given the same hidden state at each real token; an empty-label sequence gets 0 tokens."""
    generator = torch.Generator().manual_seed(1)
    lengths = [6, 3, 9, 4]  # [chosen 0, chosen 1, rejected 0, rejected 1]
    ids = [torch.randint(0, 11, (n,), generator=generator).tolist() for n in lengths]
    labels = [[IGNORE_INDEX] * 2 + seq[2:] for seq in ids]
    labels[1] = [IGNORE_INDEX] * 3  # no label token at all
    head = torch.randn(11, 8, generator=generator)
    states = [torch.randn(n, 8, generator=generator) for n in lengths]
    padded = pad_batch(ids, labels, 0, 8)
    hidden = torch.zeros(4, padded["input_ids"].shape[1], 8)
    for i, s in enumerate(states):
        hidden[i, :len(s)] = s
    packed = pack_batch(ids, labels)
    want_sums, want_counts = sequence_logps(hidden, head, padded["labels"], ld_alpha=ld_alpha)
    got_sums, got_counts = sequence_logps(torch.cat(states)[None], head, packed["labels"], ld_alpha=ld_alpha,
                                          sequence_index=packed["sequence_index"])
    assert got_counts.tolist() == want_counts.tolist() == [4, 0, 7, 2]
    torch.testing.assert_close(got_sums, want_sums)


def test_router_aux_loss_and_logps_of_a_packed_batch_equal_the_padded_batch(tiny_model_dir, tmp_path):
    """qwen3_moe (its config turns the router aux loss on): the packed row counts every token, as the padded
    batch's mask counts its real ones."""
    from kllama.data import PairwiseCollator, build_dataset, get_template
    from kllama.train.run import preference_settings
    from kllama.train.trainer import policy_logps
    from kllama.config import build_config

    model_dir = tiny_model_dir("qwen3_moe")
    config = build_config({"model_name_or_path": str(model_dir), "output_dir": str(tmp_path), "stage": "dpo",
                           "dataset": "dpo_en_demo", "template": "qwen", "cutoff_len": 48, "max_samples": 3,
                           "use_kt": True, "expert_placement": "cpu"})
    loaded = _loaded(model_dir, tmp_path, template="qwen")
    rows = build_dataset(config.data, loaded.tokenizer, get_template("qwen", loaded.tokenizer), stage="dpo", seed=0)
    rows = [rows.train[i] for i in range(3)]
    settings = preference_settings(config, loaded.model.config)
    assert settings.router_aux_loss_coef
    results = {}
    with torch.no_grad():
        for packed in (False, True):
            collate = PairwiseCollator(loaded.tokenizer.pad_token_id, packed=packed)
            batch = {k: v.to(loaded.device) if torch.is_tensor(v) else v for k, v in collate(rows).items()}
            results[packed] = policy_logps(loaded.model, batch, settings)
    (sums_a, counts_a, aux_a), (sums_b, counts_b, aux_b) = results[False], results[True]
    assert counts_a.tolist() == counts_b.tolist() and len(counts_a) == 6
    torch.testing.assert_close(sums_b, sums_a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(aux_b, aux_a, rtol=1e-5, atol=1e-6)


def test_packed_passes_count_real_tokens_largest_first():
    lengths = [900, 300, 700, 100]  # real tokens of each row (chosen + rejected)
    assert chunk_rows(lengths, 2, 1000, packed=True) == [[0, 3], [2, 1]]  # first fit: 2 passes (next fit takes 3)
    assert pass_tokens(lengths, 2, 1000, packed=True) == [1000, 1000]
    # the fewest passes, then balanced: 1,000 + 800 would put 1,000 tokens in the largest pass, 900 + 900 does not
    assert chunk_rows([600, 500, 400, 300], 2, 1000, packed=True) == [[0, 3], [1, 2]]
    assert chunk_rows([600, 500, 450, 400], 2, 1000, packed=True) == [[0, 3], [1, 2]]  # 1,000 and 950 both fit
    assert chunk_rows(lengths, 2, 10**6, packed=True) == [[0, 2, 1, 3]]
    assert chunk_rows([1500, 10], 2, 1000, packed=True) == [[0], [1]]  # a row over the budget runs alone
    assert StepShape(2, 2, 1000, packed=True).largest_pass(lengths) == 900  # steps [900, 300], [700, 100]
    # the bound over any order: the longest row alone, or the budget, or the step's largest rows together
    assert largest_pass_tokens(lengths, 2, 4, 1000, packed=True) == 1000
    assert largest_pass_tokens(lengths, 2, 2, 10**6, packed=True) == 1600
    assert largest_pass_tokens([1500, 10], 2, 2, 1000, packed=True) == 1500
    assert passes_per_step(lengths, [0, 1, 2, 3], 2, 2, 1000, packed=True) == Counter({1: 1, 2: 1})


def test_the_start_line_says_packed_and_the_real_tokens_per_pass():
    plan = BatchPlan(1, 2, 1000, 2, "pairs", packed=True)
    lengths, order = [900, 300, 700, 100], [0, 1, 2, 3]
    passes = passes_per_step(lengths, order, 2, 2, 1000, packed=True)
    line = describe(plan, Counter(stream=3), passes, layout_phrase(plan, lengths, order, passes), 900)
    assert "; packed (padding-free), 667 real tokens per pass on average, steps not grouped by length" in line
    assert "largest pass (900 real tokens)" in line and "% padding" not in line


def _engine(mode: str) -> SimpleNamespace:
    from kllama.experts.placement import ExpertPlacement

    return SimpleNamespace(placements={f"l{i}": ExpertPlacement.from_mode(mode) for i in range(3)})


@pytest.mark.parametrize("choice,mode,attention,want", [
    (None, "stream", "sdpa", True),          # host-held experts: packed by default (1.13x on the H200 box)
    (None, "cpu", "flash_attention_2", True),
    (None, "gpu", "sdpa", False),            # resident experts: no per-pass copy to save
    (None, "stream", "some_kernel", False),  # an attention that may not read packed rows
    (False, "stream", "sdpa", False),
    (True, "stream", "sdpa", True),
    (True, "gpu", "eager", True),
])
def test_when_a_run_packs(choice, mode, attention, want, tiny_model_dir):
    from kllama.config import build_config

    config = build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": "/nonexistent/o",
                           "stage": "dpo", "dataset": "dpo_en_demo", "use_kt": True, "padding_free": choice})
    assert padding_free_for(config, _engine(mode), attention) is want


def test_forcing_packing_on_an_attention_that_cannot_is_a_clear_error(tiny_model_dir):
    from kllama.config import build_config
    from kllama.errors import KllamaError

    config = build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": "/nonexistent/o",
                           "stage": "dpo", "dataset": "dpo_en_demo", "use_kt": True, "padding_free": True})
    with pytest.raises(KllamaError, match="padding_free: true needs .* set flash_attn: sdpa, or padding_free: false"):
        padding_free_for(config, _engine("stream"), "some_kernel")


def test_packed_precompute_passes_stay_at_16k_tokens(tiny_model_dir):
    """sdpa materialises a packed pass's N x N mask: 4 x 16,384 tokens would be 4.3 GB of it."""
    from kllama.config import build_config

    config = build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": "/nonexistent/o",
                           "stage": "dpo", "dataset": "dpo_en_demo", "use_kt": True,
                           "precompute_ref_log_probs": True})
    assert reference_pass_budget(config, _engine("stream"), packed=True) == 16384
    assert reference_pass_budget(config, _engine("stream"), packed=False) == 4 * 16384


def _packed_row(kv_heads: int, qk_dim: int, v_dim: int, seed: int):
    """A 13-token packed row of sequences 5, 1 and 7 long, 4 query heads: (module, bounds, generator, (q, k, v))."""
    module = SimpleNamespace(is_causal=True, num_key_value_groups=4 // kv_heads)
    generator = torch.Generator().manual_seed(seed)
    shapes = ((1, 4, 13, qk_dim), (1, kv_heads, 13, qk_dim), (1, kv_heads, 13, v_dim))
    tensors = tuple(torch.randn(shape, generator=generator, requires_grad=True) for shape in shapes)
    return module, (0, 5, 6, 13), generator, tensors


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA, and GQA (two query heads per key/value head)
def test_per_sequence_sdpa_equals_the_masked_packed_attention(kv_heads):
    """Each sequence causal on its own slice = the block-diagonal masked row, forward and backward (a 1-token
    sequence included); a call without bounds is transformers' sdpa unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kllama.train.packing import SEQUENCE_BOUNDS, per_sequence_sdpa

    module, bounds, generator, (q, k, v) = _packed_row(kv_heads, 8, 6, seed=2)
    segment = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 1, 7]))
    mask = (segment[:, None] == segment[None, :]) & torch.ones(13, 13, dtype=torch.bool).tril()  # [13, 13]
    want = sdpa_attention_forward(module, q, k, v, mask[None, None], scaling=0.3)[0]  # [1, 13, 4, 6]
    got = per_sequence_sdpa(module, q, k, v, None, scaling=0.3, **{SEQUENCE_BOUNDS: bounds})[0]
    torch.testing.assert_close(got, want)
    weights = torch.randn(want.shape, generator=generator)
    grads_want = torch.autograd.grad((want * weights).sum(), (q, k, v))
    grads_got = torch.autograd.grad((got * weights).sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b)
    plain = per_sequence_sdpa(module, q, k, v, mask[None, None], scaling=0.3)[0]
    torch.testing.assert_close(plain, want, rtol=0, atol=0)


@pytest.mark.parametrize("query_dim,value_dim,device,want", [
    (192, 128, "cuda", 192),  # MLA (DeepSeek-V2/V3): v padded so flash takes the calls
    (128, 128, "cuda", 128),  # equal heads (Qwen3-MoE, Mixtral): nothing to pad
    (192, 128, "cpu", 128),   # no flash kernel to win on the CPU
    (320, 128, "cuda", 128),  # wider than flash takes
    (100, 64, "cuda", 64),    # not a multiple of 8
])
def test_a_narrower_value_is_padded_only_where_flash_then_runs(query_dim, value_dim, device, want):
    from kllama.train.packing import flash_value_width

    assert flash_value_width(query_dim, value_dim, device) == want


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_zero_padded_value_gives_the_same_attention_and_gradients(kv_heads):
    """What the padding for flash does to the numbers: nothing (zero columns of v add zero output columns, cut off
    again), forward and backward, MLA-like widths (q/k wider than v), on the tensors' own device."""
    from kllama.train.packing import sequence_attention

    module, bounds, generator, (q, k, v) = _packed_row(kv_heads, 24, 16, seed=4)
    plain = sequence_attention(module, q, k, v, bounds, 16, scaling=24 ** -0.5)
    padded = sequence_attention(module, q, k, v, bounds, 24, scaling=24 ** -0.5)
    assert plain.shape == padded.shape == (1, 13, 4, 16)
    torch.testing.assert_close(padded, plain)
    weights = torch.randn(plain.shape, generator=generator)
    for a, b in zip(torch.autograd.grad((padded * weights).sum(), (q, k, v)),
                    torch.autograd.grad((plain * weights).sum(), (q, k, v))):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shared", [False, True])
def test_the_backward_writes_a_full_row_gradient_a_constant_number_of_times(shared):
    """The per-sequence calls' backward touches a full packed-row-sized tensor a fixed number of times, whatever the
    number of sequences (a slice per sequence cost a zero-filled full-row gradient and a full-row add per sequence:
    ~6 ms of a 51 ms V2-Lite layer on the H200 box). Counted on 2 and 12 sequences of the same row, with prefixes
    (prefix sharing: every second sequence attends to the previous one's first rows) and without."""
    from kllama.train.packing import sequence_attention

    def full_row_ops(sequences: int) -> int:
        n, heads, dim = 96, 2, 8
        bounds = tuple(range(0, n + 1, n // sequences))
        prefixes = tuple((bounds[i - 1], bounds[i - 1] + 3) if shared and i % 2 else (0, 0)
                         for i in range(sequences)) if shared else None
        module = SimpleNamespace(is_causal=True, num_key_value_groups=1)
        q, k, v = (torch.randn(1, heads, n, dim, requires_grad=True) for _ in range(3))
        out = sequence_attention(module, q, k, v, bounds, dim, scaling=0.3, prefixes=prefixes)
        counter = OpCounter(lambda func, out: out.numel() >= q.numel())
        with counter:
            out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
        return counter.count

    assert full_row_ops(12) == full_row_ops(2)


def test_per_sequence_calls_keep_cudnn_attention_off_and_other_calls_as_they_were(monkeypatch):
    """The per-sequence calls of a packed row run with cuDNN's sdpa backend disabled (a new plan per slice shape
    made packed steps 14x slower on the H200 box), restored after; a call without bounds keeps torch's setting."""
    from kllama.train.packing import SEQUENCE_BOUNDS, per_sequence_sdpa

    seen: list[bool] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def observed(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", observed)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    per_sequence_sdpa(module, q, k, v, None, **{SEQUENCE_BOUNDS: (0, 4, 9)})
    assert seen == [False, False]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    per_sequence_sdpa(module, q, k, v, None)
    assert seen[-1] == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_sequence_sdpa_on_the_gpu_matches_the_masked_row_at_v2_lite_shapes():
    """bf16 on CUDA, V2-Lite's attention shapes (16 heads, MLA q/k 192, v 128) and a 6,200-token row of 16
    sequences (the seed YAML's step): the per-sequence kernels agree with the dense block-diagonal mask, forward and
    backward, and they are flash's (v padded to 192), not cuDNN's or the memory-efficient kernel's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kllama.train.packing import SEQUENCE_BOUNDS, per_sequence_sdpa

    generator = torch.Generator(device="cuda").manual_seed(3)
    lengths = torch.randint(100, 700, (16,), generator=generator, device="cuda").tolist()
    bounds = (0, *torch.tensor(lengths).cumsum(0).tolist())
    n = bounds[-1]
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1)
    q, k = (torch.randn(1, 16, n, 192, generator=generator, device="cuda", dtype=torch.bfloat16).requires_grad_()
            for _ in range(2))
    v = torch.randn(1, 16, n, 128, generator=generator, device="cuda", dtype=torch.bfloat16).requires_grad_()
    segment = torch.repeat_interleave(torch.arange(16, device="cuda"), torch.tensor(lengths, device="cuda"))
    mask = (segment[:, None] == segment[None, :]) & torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
    want = sdpa_attention_forward(module, q, k, v, mask[None, None], scaling=192 ** -0.5)[0]
    got = per_sequence_sdpa(module, q, k, v, None, scaling=192 ** -0.5, **{SEQUENCE_BOUNDS: bounds})[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    weights = torch.randn(want.shape, generator=generator, device="cuda", dtype=torch.bfloat16)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), (q, k, v)),
                    torch.autograd.grad((want * weights).sum(), (q, k, v))):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
    # acc_events: torch warns that a profiler used again "clears events at the end of each cycle"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as prof:
        per_sequence_sdpa(module, q, k, v, None, scaling=192 ** -0.5, **{SEQUENCE_BOUNDS: bounds})
    ops = [e.key.lower() for e in prof.key_averages()]
    assert not [op for op in ops if "cudnn" in op]  # no per-shape cuDNN plans
    assert [op for op in ops if "flash" in op] and not [op for op in ops if "efficient" in op]  # v padded for flash


def test_packed_steps_are_not_grouped_by_length_and_the_largest_runs_first():
    """Grouping only saves padding; packed, it would put the longest rows in the same steps (more of them over the
    budget). The order is still a seeded permutation of whole steps with the epoch's largest pass first."""
    from kllama.train.micro_batching import grouped_order

    rng = random.Random(0)
    lengths = [int(400 * rng.lognormvariate(0, 0.45)) for _ in range(400)]  # pairs spread like a preference set
    shape = StepShape(8, 2, 4600, packed=True)
    order = grouped_order(lengths, 8, seed=5, shape=shape)
    assert sorted(order) == list(range(400)) and order == grouped_order(lengths, 8, seed=5, shape=shape)
    steps = [[lengths[i] for i in order[s:s + 8]] for s in range(0, 400, 8)]
    sizes = [shape.largest_pass(step) for step in steps]
    assert sizes[0] == max(sizes)
    spread = [max(step) - min(step) for step in steps]
    grouped = grouped_order(lengths, 8, seed=5, shape=StepShape(8, 2, 4600))
    grouped_spread = [max(lengths[i] for i in grouped[s:s + 8]) - min(lengths[i] for i in grouped[s:s + 8])
                      for s in range(0, 400, 8)]
    assert sum(spread) > 3 * sum(grouped_spread)  # rows of all lengths share a step
    over = sum(sum(step) > 4600 for step in steps)
    grouped_over = sum(sum(lengths[i] for i in grouped[s:s + 8]) > 4600 for s in range(0, 400, 8))
    assert over < grouped_over, (over, grouped_over)
