"""Chunked sequence log-probs against the naive full-logits computation: values, gradients, memory."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kllama.train.logprobs import (
    LogitTransform,
    ld_token_weights,
    logit_transform_for,
    sequence_logps,
    token_logps,
)

B, T, H, V = 4, 13, 16, 97


def naive_logps(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, transform: LogitTransform = LogitTransform()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook way: full [B, T, V] logits, log_softmax, gather, mask, sum (as TRL / LLaMA-Factory do)."""
    logits = head(hidden).float() * transform.scale  # [B, T, V]
    if transform.softcap is not None:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    safe = labels.clamp(min=0)
    per_token = logits.log_softmax(-1).gather(2, safe[..., None]).squeeze(2)  # [B, T-1]
    return (per_token * mask).sum(-1).double(), mask.sum(-1)  # float64, the dtype of sequence_logps' sums


def make_batch(seed: int = 0, dtype: torch.dtype = torch.float32, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen))
        if bias:
            head.bias.copy_(torch.randn(V, generator=gen))
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=gen)
    # prompt masked at the front, padding at the back, lengths differ per row; one masked hole mid-response
    for row, (prompt, length) in enumerate([(3, 13), (5, 9), (1, 12), (4, 4)]):
        labels[row, :prompt] = -100
        labels[row, length:] = -100
    labels[0, 7] = -100
    return head, hidden, labels


@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 16, 4096])
@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(scale=0.5, softcap=3.0)])
def test_matches_naive_values_and_gradients(chunk_tokens: int, transform: LogitTransform) -> None:
    head, hidden, labels = make_batch()
    sums, counts = sequence_logps(hidden, head, labels, chunk_tokens=chunk_tokens, transform=transform)
    weights = torch.randn(B)  # a non-uniform upstream gradient
    (sums * weights).sum().backward()
    got = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())

    hidden.grad = None
    head.zero_grad()
    ref_sums, ref_counts = naive_logps(hidden, head, labels, transform)
    (ref_sums * weights).sum().backward()

    assert counts.tolist() == ref_counts.tolist() == [9, 4, 11, 0]
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    for mine, ref in zip(got, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    assert sums[3].item() == 0.0  # a row without label tokens


def test_weight_tensor_and_tied_head_without_bias() -> None:
    head, hidden, labels = make_batch(seed=1, bias=False)
    sums, _ = sequence_logps(hidden, head.weight, labels, chunk_tokens=6)
    sums.sum().backward()
    grad_w = head.weight.grad.clone()
    head.zero_grad()
    ref, _ = naive_logps(hidden, head, labels)
    ref.sum().backward()
    torch.testing.assert_close(sums, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w, head.weight.grad, rtol=1e-5, atol=1e-5)


def test_masked_labels_are_ignored() -> None:
    head, hidden, labels = make_batch(seed=2)
    sums, _ = sequence_logps(hidden, head, labels, chunk_tokens=4)
    # changing the hidden state at a position whose next label is masked changes nothing
    poked = hidden.detach().clone()
    poked[1, 10] += 100.0  # row 1 labels end at 9: position 10 predicts a masked label
    poked[0, 6] -= 50.0  # predicts labels[0, 7], the masked hole
    poked_sums, _ = sequence_logps(poked, head, labels, chunk_tokens=4)
    assert torch.equal(sums.detach(), poked_sums)
    # and a masked position receives zero gradient
    sums.sum().backward()
    assert hidden.grad[1, 10].abs().sum() == 0 and hidden.grad[0, 6].abs().sum() == 0
    assert hidden.grad[0, 5].abs().sum() > 0


def test_frozen_head_gets_no_gradient_but_hidden_does() -> None:
    head, hidden, labels = make_batch(seed=3)
    head.requires_grad_(False)
    sums, _ = sequence_logps(hidden, head, labels, chunk_tokens=5)
    sums.sum().backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_generic_module_head_checkpointed_matches_naive() -> None:
    from peft import LoraConfig, get_peft_model

    class Wrapper(nn.Module):
        def __init__(self, head: nn.Module) -> None:
            super().__init__()
            self.lm_head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lm_head(x)

    head, hidden, labels = make_batch(seed=4)
    model = get_peft_model(Wrapper(head), LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    lora_head = model.base_model.model.lm_head
    assert type(lora_head) is not nn.Linear  # the checkpoint path
    sums, _ = sequence_logps(hidden, lora_head, labels, chunk_tokens=4)
    sums.sum().backward()
    lora_params = [p for p in model.parameters() if p.requires_grad]
    assert lora_params
    got = [p.grad.clone() for p in lora_params] + [hidden.grad.clone()]
    model.zero_grad()
    hidden.grad = None
    ref, _ = naive_logps(hidden, lora_head, labels)
    ref.sum().backward()
    torch.testing.assert_close(sums, ref, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(got, [p.grad for p in lora_params] + [hidden.grad]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_bf16_close_to_fp32_reference() -> None:
    head, hidden, labels = make_batch(seed=5, dtype=torch.bfloat16)
    sums, _ = sequence_logps(hidden, head, labels, chunk_tokens=5)
    assert sums.dtype == torch.float64
    sums.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.bfloat16
    ref, _ = naive_logps(hidden.detach().float(), head.float(), labels)
    torch.testing.assert_close(sums, ref, rtol=2e-2, atol=0.5)


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()  # the graph works with what was saved
    return total


@pytest.mark.parametrize("generic_head", [False, True])
def test_autograd_graph_keeps_no_token_by_vocab_tensor(generic_head: bool) -> None:
    n, width, vocab = 512, 8, 2048
    head = nn.Linear(width, vocab, bias=False)
    module: nn.Module = nn.Sequential(head) if generic_head else head
    hidden = torch.randn(n, width, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    logits_bytes = n * vocab * 4

    naive = _saved_bytes(lambda: module(hidden).float().log_softmax(-1).gather(1, targets[:, None]))
    chunked = _saved_bytes(lambda: token_logps(hidden, module, targets, chunk_tokens=64))
    assert naive >= logits_bytes  # the measurement sees full logits when they are kept
    # what may be kept: hidden [N, H], the head weight [V, H], targets, one fp32 per row
    allowed = hidden.numel() * 4 + head.weight.numel() * 4 + n * 8 + n * 4
    assert chunked <= allowed < logits_bytes / 4


def test_ld_alpha_weights_tokens_past_shorter_response() -> None:
    # pair: chosen has 4 label tokens, rejected 2 -> chosen tokens 3 and 4 weigh alpha
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    weights = ld_token_weights(mask, 0.25)
    assert weights.tolist() == [[0, 1, 1, 0.25, 0.25, 0], [0, 0, 1, 0, 1, 0]]
    with pytest.raises(ValueError, match="even"):
        ld_token_weights(mask[:1], 0.5)


def test_sequence_logps_ld_alpha_by_hand() -> None:
    # uniform head (zero weights): every token has log-prob -log(V)
    vocab = 10
    hidden = torch.zeros(2, 6, 3)
    labels = torch.full((2, 6), -100)
    labels[0, 1:6] = 1  # chosen: 5 label tokens
    labels[1, 3:5] = 2  # rejected: 2 label tokens
    sums, counts = sequence_logps(hidden, torch.zeros(vocab, 3), labels, ld_alpha=0.5, chunk_tokens=3)
    assert counts.tolist() == [5, 2]
    assert sums.tolist() == pytest.approx([-(2 + 0.5 * 3) * math.log(vocab), -2 * math.log(vocab)])


def test_logit_transform_from_configs() -> None:
    from transformers import CohereConfig, DeepseekV2Config, Gemma2Config, GraniteMoeConfig

    assert logit_transform_for(DeepseekV2Config()) == LogitTransform()
    assert logit_transform_for(CohereConfig(logit_scale=0.25)) == LogitTransform(scale=0.25)
    assert logit_transform_for(GraniteMoeConfig(logits_scaling=4.0)) == LogitTransform(scale=0.25)
    assert logit_transform_for(Gemma2Config(final_logit_softcapping=30.0)) == LogitTransform(softcap=30.0)


def test_empty_and_bad_inputs() -> None:
    head = nn.Linear(H, V)
    hidden = torch.randn(2, 5, H, requires_grad=True)
    sums, counts = sequence_logps(hidden, head, torch.full((2, 5), -100))
    assert sums.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    with pytest.raises(ValueError, match="disagree"):
        sequence_logps(hidden, head, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logps(hidden[0], head, torch.zeros(5, dtype=torch.long), chunk_tokens=0)


def test_no_grad_mode() -> None:
    head, hidden, labels = make_batch(seed=6)
    with torch.no_grad():
        a, _ = sequence_logps(hidden, head, labels, chunk_tokens=3)
        b, _ = sequence_logps(hidden, nn.Sequential(head), labels, chunk_tokens=3)
    assert not a.requires_grad
    torch.testing.assert_close(a, b)


def test_long_sequence_sums_match_a_float64_reference() -> None:
    """The per-sequence sum of 6,000 token log-probs, against the same computation done entirely in float64: the
    sum is accumulated in float64, so only the fp32 per-token log-probs differ (~4e-10; an fp32 sum: ~1e-6)."""
    gen = torch.Generator().manual_seed(11)
    n, width, vocab = 6000, 32, 509
    head = nn.Linear(width, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=gen) * 0.3)
    hidden = torch.randn(2, n + 1, width, generator=gen)
    labels = torch.randint(0, vocab, (2, n + 1), generator=gen)
    labels[1, : n // 3] = -100
    with torch.no_grad():
        sums, _ = sequence_logps(hidden, head, labels, chunk_tokens=1024)
        logits = hidden.double() @ head.weight.double().t()  # [2, T, V] float64
        per_token = logits[:, :-1].log_softmax(-1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(2)
        ref = (per_token * (labels[:, 1:] != -100)).sum(-1)  # [2] float64
    assert sums.dtype == torch.float64
    rel = ((sums - ref).abs() / ref.abs()).max().item()
    assert rel < 1e-8, f"relative error {rel:.2e} against float64"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_trainable", [False, True])
def test_gpu_peak_memory_at_deepseek_v2_lite_vocab(head_trainable: bool) -> None:
    """16k label tokens at vocab 102,400 (full logits: 6.7 GB fp32): extra peak stays ~ a few chunks of logits."""
    torch.manual_seed(0)
    n, width, vocab, chunk = 16384, 2048, 102400, 2048
    device = torch.device("cuda")
    head = nn.Linear(width, vocab, bias=False, device=device, dtype=torch.bfloat16)
    head.weight.data.normal_(0, 0.02)
    head.requires_grad_(head_trainable)
    hidden = torch.randn(1, n + 1, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n + 1), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sums, _ = sequence_logps(hidden, head, labels, chunk_tokens=chunk)
    sums.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    chunk_logits = chunk * vocab * 4
    grads = hidden.numel() * 2 * 3 + (vocab * width * (4 + 2 + 2) if head_trainable else 0)  # + fp32 acc, part, .grad
    assert extra < 2 * chunk_logits + grads, f"extra peak {extra / 2**30:.2f} GiB"
    # values against the naive computation on a slice that fits
    m = 512
    with torch.no_grad():
        ref, _ = naive_logps(hidden[:, : m + 1].float(), head.float(), labels[:, : m + 1])
        got, _ = sequence_logps(hidden[:, : m + 1], head, labels[:, : m + 1], chunk_tokens=100)
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1.0)  # both float64


def test_head_chunks_hold_a_fixed_byte_budget_of_logits() -> None:
    # one chunk's logits (bf16 + fp32, 6 bytes each) within 512 MiB: DeepSeek-V2's vocab 873 rows (was a fixed
    # 4,096 = 2.5 GB beside the resident experts), Qwen3's 588; small vocabularies stop at 8,192 rows, huge ones at 256
    from kllama.train.logprobs import LOGITS_CHUNK_BYTES, logits_chunk_tokens

    assert logits_chunk_tokens(102_400) == 873 and logits_chunk_tokens(151_936) == 588
    assert 6 * 102_400 * logits_chunk_tokens(102_400) <= LOGITS_CHUNK_BYTES
    assert logits_chunk_tokens(32) == 8192 and logits_chunk_tokens(10_000_000) == 256
