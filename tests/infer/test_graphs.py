"""The static-cache decoder (CPU: its eager fallback) decodes exactly what the plain transformers loop decodes."""
from __future__ import annotations

import pytest
import torch

from kllama.compat import peft_wrapped
from kllama.experts import ExpertPlacement, install_expert_engine
from kllama.infer.batching import cache_argument, transformers_model
from kllama.infer.graphs import GraphedDecoder, graphed_decoder
from kllama.model.tiny import build_tiny_model


def plain_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits they came from, with transformers' own dynamic cache."""
    device = next(model.parameters()).device
    key = cache_argument(transformers_model(model))
    tokens, seen = [], []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        for _ in range(steps):
            logits = out.logits[0, -1]
            seen.append(logits.float().cpu())
            tokens.append(int(logits.argmax()))
            cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
            out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), use_cache=True, **{key: cache})
    return tokens, seen


def engine_model(arch: str, placement: str = "cpu") -> torch.nn.Module:
    model = build_tiny_model(arch, seed=0)
    install_expert_engine(model, lambda name: ExpertPlacement.from_mode(placement, cpu_threads=1), "cpu")
    return model


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_static_cache_decoder_matches_the_dynamic_cache_loop(arch: str, attention: str) -> None:
    model = engine_model(arch)
    model.config._attn_implementation = attention
    prompt = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    expected, expected_logits = plain_greedy(model, prompt, 10)
    decoder = graphed_decoder(model, max_batch=2, max_len=32)
    assert isinstance(decoder, GraphedDecoder) and not decoder.graphed and "CUDA" in decoder.reason
    logits = decoder.prefill(prompt, slot=1)
    got = []
    for i in range(10):
        assert torch.allclose(logits.float(), expected_logits[i], atol=1e-5), f"step {i}"
        got.append(int(logits.argmax()))
        logits = decoder.step([0, got[-1]], [0, len(prompt) + i])[1]  # slot 0 idles at position 0
    assert got == expected


def test_slots_decode_independently_at_their_own_positions() -> None:
    model = engine_model("deepseek_v2")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 8)]
    expected = [plain_greedy(model, p, 6)[0] for p in prompts]
    decoder = graphed_decoder(model, max_batch=4, max_len=24)
    last = [int(decoder.prefill(p, slot=s).argmax()) for s, p in enumerate(prompts)]
    got = [[t] for t in last]
    for i in range(5):
        logits = decoder.step(last, [len(p) + i for p in prompts])  # three slots, each at its own position
        last = logits.argmax(-1).tolist()
        for s, token in enumerate(last):
            got[s].append(token)
    assert got == expected
    # a slot is reused from position 0 by a new prompt: nothing of the old sequence leaks into it
    assert int(decoder.prefill(prompts[0], slot=1).argmax()) == expected[0][0]


def test_decoder_checks_sizes_and_unsupported_attention() -> None:
    model = engine_model("qwen3_moe")
    decoder = graphed_decoder(model, max_batch=2, max_len=8)
    assert decoder.buckets() == [1, 2]
    with pytest.raises(ValueError, match="does not fit"):
        decoder.prefill(list(range(9)))
    with pytest.raises(ValueError, match="max_batch=2"):
        decoder.step([1, 2, 3], [0, 0, 0])
    with pytest.raises(ValueError, match="past max_len"):
        decoder.step([1], [8])
    assert GraphedDecoder(model, 5, 8).buckets() == [1, 2, 4, 5]
    model.config._attn_implementation = "flash_attention_2"  # takes no 4-D mask: the caller keeps its own loop
    assert graphed_decoder(model, 1, 8) is None


def test_decoder_runs_a_peft_wrapped_model() -> None:
    # the ktransformers backend serves adapters unmerged: a PEFT wrapper around the engine model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["o_proj", "q_proj"])
    model = peft_wrapped(lambda: get_peft_model(engine_model("qwen3_moe"), config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(3))
    model.eval()
    prompt = list(range(3, 12))
    expected, _ = plain_greedy(model, prompt, 6)
    decoder = graphed_decoder(model, max_batch=1, max_len=16)
    got = [int(decoder.prefill(prompt).argmax())]
    for i in range(5):
        got.append(int(decoder.step([got[-1]], [len(prompt) + i])[0].argmax()))
    assert got == expected


def test_decoder_forwards_never_use_cudnn_attention() -> None:
    # cuDNN attention builds a graph per new shape (a new prompt length stalled a first answer for ~1-2 s on the
    # H200 box); every forward of the decoder (prompt reads, packed steps, decode steps, captures) runs without it,
    # and the process's own setting is back afterwards
    model = engine_model("deepseek_v2")
    seen: list[bool] = []
    attention = transformers_model(model).model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        decoder = GraphedDecoder(model, 2, 32)
        logits = decoder.prefill([3, 1, 4, 1, 5], slot=0)
        decoder.packed([(1, 0, [9, 2, 6])])
        decoder.step([int(logits.argmax()), 7], [5, 3])
    finally:
        handle.remove()
    assert len(seen) == 3 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_host_nodes_are_not_used_under_an_active_openmp_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from kllama.experts.host_func import host_func_reason
    from kllama.infer.graphs import host_nodes_reason

    monkeypatch.setenv("OMP_WAIT_POLICY", " Active")
    assert "OMP_WAIT_POLICY=active" in host_nodes_reason()
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert host_nodes_reason() == host_func_reason()  # None with a CUDA driver, else why not
    if not torch.cuda.is_available():
        assert host_func_reason() == "no CUDA device"
