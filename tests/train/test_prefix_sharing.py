"""Prefix sharing (`prefix_sharing`): a packed DPO pair's prompt computed once gives the unshared numbers: the
attention of a sequence with a prefix, whole training steps (loss and every LoRA gradient) for several losses,
families, the precomputed and lock-step references, and when a run may share. The collate layout:
tests/data/test_data_collate.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_micro_batching import first_step

from kllama.errors import KllamaError
from kllama.train.packing import SEQUENCE_BOUNDS, SEQUENCE_PREFIXES, per_sequence_sdpa, sequence_attention

SHARED = 4  # prompt tokens the pair in `_rows` shares


def _rows(kv_heads: int, qk_dim: int, v_dim: int, seed: int, lengths: tuple[int, int, int, int] = (6, 3, 3, SHARED),
          heads: int = 4, device: str = "cpu", dtype: torch.dtype = torch.float32):  # noqa: ANN202
    """Leaves of a chosen sequence (`lengths[0]` rows, its first `lengths[3]` the prompt), another sequence and a
    rejected answer (`lengths[1]`, `lengths[2]` rows), for `heads` query heads; and a function that lays q, k or v
    out as the unshared packed row (the rejected sequence repeats the prompt; default 16 rows) or the shared one
    (only the prompt's last row; default 13 rows)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    widths = {"q": (heads, qk_dim), "k": (kv_heads, qk_dim), "v": (kv_heads, v_dim)}
    leaves = {name: [torch.randn(1, h, n, d, generator=generator, device=device, dtype=dtype).requires_grad_()
                     for n in lengths[:3]] for name, (h, d) in widths.items()}
    shared_rows = lengths[3]

    def row(name: str, shared: bool) -> torch.Tensor:
        chosen, other, answer = leaves[name]
        prompt = chosen[:, :, shared_rows - 1:shared_rows] if shared else chosen[:, :, :shared_rows]
        return torch.cat([chosen, other, prompt, answer], dim=2)

    return SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv_heads), generator, leaves, row


@pytest.mark.parametrize("kv_heads,qk_dim,v_dim,width", [
    (4, 8, 8, 8),     # MHA
    (2, 8, 8, 8),     # GQA: two query heads per key/value head
    (2, 24, 16, 16),  # MLA-like widths (q/k wider than v) without the flash padding ...
    (2, 24, 16, 24),  # ... and with it (v zero-padded to q's width)
])
def test_a_prefix_gives_the_unshared_attention_and_gradients(kv_heads, qk_dim, v_dim, width):
    """The rejected sequence's rows attending to the chosen sequence's prompt rows first equal the unshared row's
    rejected rows from the prompt's last token on, forward and backward: with the unshared row's outputs over the
    repeated prompt rows weighted onto the chosen prompt rows that equal them, every leaf's gradient is the same."""
    module, generator, leaves, row = _rows(kv_heads, qk_dim, v_dim, seed=5)
    scaling = qk_dim ** -0.5
    unshared = sequence_attention(module, row("q", False), row("k", False), row("v", False), (0, 6, 9, 16), width,
                                  scaling=scaling)  # [1, 16, 4, v_dim]
    shared = sequence_attention(module, row("q", True), row("k", True), row("v", True), (0, 6, 9, 13), width,
                                scaling=scaling, prefixes=((0, 0), (0, 0), (0, SHARED - 1)))  # [1, 13, 4, v_dim]
    assert shared.shape == (1, 13, 4, v_dim)
    torch.testing.assert_close(shared[:, :9], unshared[:, :9])
    torch.testing.assert_close(shared[:, 9:], unshared[:, 9 + SHARED - 1:])
    weights = torch.randn(unshared.shape, generator=generator)  # [1, 16, 4, v_dim]
    folded = torch.cat([weights[:, :9], weights[:, 9 + SHARED - 1:]], dim=1).clone()  # [1, 13, 4, v_dim]
    folded[:, :SHARED - 1] += weights[:, 9:9 + SHARED - 1]  # the repeated prompt's outputs = the chosen prompt's
    every_leaf = [t for name in "qkv" for t in leaves[name]]
    for a, b in zip(torch.autograd.grad((shared * folded).sum(), every_leaf),
                    torch.autograd.grad((unshared * weights).sum(), every_leaf)):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_prefix_on_the_gpu_matches_the_unshared_rows_with_flash_at_v2_lite_shapes():
    """bf16 on CUDA, V2-Lite's attention (16 heads, MLA q/k 192, v 128 padded to 192 for flash), a 250-token prompt:
    the shared rejected rows agree with the unshared ones, and the calls run flash's kernel (not cuDNN's or the
    memory-efficient one)."""
    module, _, _, row = _rows(16, 192, 128, seed=7, lengths=(740, 500, 490, 250), heads=16, device="cuda",
                              dtype=torch.bfloat16)
    n_shared, n_unshared = 740 + 500 + 1 + 490, 740 + 500 + 250 + 490
    kwargs = {"scaling": 192 ** -0.5, SEQUENCE_BOUNDS: (0, 740, 1240, n_shared),
              SEQUENCE_PREFIXES: ((0, 0), (0, 0), (0, 249))}
    with torch.no_grad():
        unshared = per_sequence_sdpa(module, row("q", False), row("k", False), row("v", False), None,
                                     scaling=192 ** -0.5, **{SEQUENCE_BOUNDS: (0, 740, 1240, n_unshared)})[0]
        shared = per_sequence_sdpa(module, row("q", True), row("k", True), row("v", True), None, **kwargs)[0]
    assert shared.shape == (1, n_shared, 16, 128)
    torch.testing.assert_close(shared[:, :1240].float(), unshared[:, :1240].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(shared[:, 1240:].float(), unshared[:, 1240 + 249:].float(), rtol=2e-2, atol=2e-2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as prof:
        per_sequence_sdpa(module, row("q", True), row("k", True), row("v", True), None, **kwargs)
    ops = [e.key.lower() for e in prof.key_averages()]
    assert not [op for op in ops if "cudnn" in op]
    assert [op for op in ops if "flash" in op] and not [op for op in ops if "efficient" in op]


def test_per_sequence_sdpa_passes_the_prefixes_on():
    """The attention transformers calls reads `SEQUENCE_PREFIXES` beside the bounds (the keyword does not reach
    torch's sdpa); without the prefixes the rejected rows see only themselves (the check can fail)."""
    module, _, _, row = _rows(2, 8, 8, seed=6)
    q, k, v = row("q", True), row("k", True), row("v", True)
    prefixes = ((0, 0), (0, 0), (0, SHARED - 1))
    got = per_sequence_sdpa(module, q, k, v, None, scaling=0.3,
                            **{SEQUENCE_BOUNDS: (0, 6, 9, 13), SEQUENCE_PREFIXES: prefixes})[0]
    want = sequence_attention(module, q, k, v, (0, 6, 9, 13), 8, scaling=0.3, prefixes=prefixes)
    alone = per_sequence_sdpa(module, q, k, v, None, scaling=0.3, **{SEQUENCE_BOUNDS: (0, 6, 9, 13)})[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(alone[:, :9], want[:, :9], rtol=0, atol=0)
    assert not torch.allclose(alone[:, 9:], want[:, 9:], atol=1e-3)


def _shared_prompts(model_dir, template: str, tmp) -> list[int]:  # noqa: ANN001
    """`shared_prompt_length` of the pairs `first_step` trains on (dpo_en_demo at cutoff_len 64)."""
    from kllama.config import build_config
    from kllama.data.collate import shared_prompt_length
    from kllama.train.preflight import prepare_inputs

    config = build_config({"model_name_or_path": str(model_dir), "output_dir": str(tmp), "stage": "dpo",
                           "dataset": "dpo_en_demo", "template": template, "cutoff_len": 64, "max_samples": 12})
    return [shared_prompt_length(r["chosen_input_ids"], r["chosen_labels"], r["rejected_input_ids"],
                                 r["rejected_labels"]) for r in prepare_inputs(config).bundle.train]


STEP_CASES = {
    "sigmoid": ("deepseek_v2", 10**6, {"pref_loss": "sigmoid"}),
    "sigmoid-passes": ("deepseek_v2", 300, {"pref_loss": "sigmoid", "ld_alpha": 0.5}),
    "orpo": ("deepseek_v2", 10**6, {"pref_loss": "orpo"}),
    "simpo": ("deepseek_v2", 10**6, {"pref_loss": "simpo", "pref_beta": 2.0}),
    "precomputed-ref": ("deepseek_v2", 10**6, {"precompute_ref_log_probs": True}),
    "qwen3_moe": ("qwen3_moe", 10**6, {"template": "qwen", "router_aux_loss_coef": 0.0}),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_a_step_sharing_prompts_equals_the_packed_step(case, tiny_model_dir, tmp_path):
    """One optimizer step of 4 pairs (one packed pass, or passes of 300 real tokens), experts on the engine (CPU):
    sharing each pair's prompt gives the unshared packed step's loss and every LoRA gradient (router aux loss off:
    it counts a shared prompt once)."""
    arch, budget, settings = STEP_CASES[case]
    model_dir = tiny_model_dir(arch)
    assert min(_shared_prompts(model_dir, settings.get("template", "deepseek"), tmp_path / "c")) >= 2  # all share
    settings = {"stage": "dpo", "dataset": "dpo_en_demo", "padding_free": True, **settings}
    loss_a, grads_a = first_step(model_dir, tmp_path / "a", settings, budget)
    loss_b, grads_b = first_step(model_dir, tmp_path / "b", {**settings, "prefix_sharing": True}, budget)
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(".experts." in k for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def _config(model_dir, **settings):  # noqa: ANN001, ANN202
    from kllama.config import build_config

    return build_config({"model_name_or_path": str(model_dir), "output_dir": "/nonexistent/o", "stage": "dpo",
                         "dataset": "dpo_en_demo", "use_kt": True, **settings})


def test_when_a_run_shares_prompts(tiny_model_dir):
    from kllama.train.packing import prefix_sharing_for

    model_dir = tiny_model_dir("deepseek_v2")
    assert prefix_sharing_for(_config(model_dir, prefix_sharing=True), True, "sdpa") is True
    assert prefix_sharing_for(_config(model_dir), True, "sdpa") is True  # unset: on where it can run
    assert prefix_sharing_for(_config(model_dir), False, "sdpa") is False  # padded passes
    assert prefix_sharing_for(_config(model_dir), True, "eager") is False  # another attention
    assert prefix_sharing_for(_config(model_dir, prefix_sharing=False), True, "sdpa") is False  # turned off
    with pytest.raises(KllamaError, match="prefix_sharing: true needs packed passes.*set padding_free: true"):
        prefix_sharing_for(_config(model_dir, prefix_sharing=True), False, "sdpa")
    with pytest.raises(KllamaError, match="needs the sdpa attention.*runs 'eager': set flash_attn: sdpa"):
        prefix_sharing_for(_config(model_dir, prefix_sharing=True), True, "eager")


def test_config_refuses_prefix_sharing_with_padded_passes_or_sft(tiny_model_dir):
    from kllama.config import build_config

    with pytest.raises(KllamaError, match="prefix_sharing: needs packed passes, and padding_free is false"):
        _config(tiny_model_dir("deepseek_v2"), prefix_sharing=True, padding_free=False)
    with pytest.raises(KllamaError, match="prefix_sharing: only used with stage: dpo"):
        build_config({"model_name_or_path": str(tiny_model_dir("deepseek_v2")), "output_dir": "/nonexistent/o",
                      "stage": "sft", "dataset": "alpaca_en_demo", "prefix_sharing": True})
