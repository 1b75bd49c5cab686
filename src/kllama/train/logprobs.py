"""Per-sequence log-probabilities of labels, computed from hidden states in chunks of tokens.

A DPO micro-step of 16k tokens at vocab 102,400 would need 6.7 GB for the fp32 logits alone, and autograd would keep
them for backward. Here logits exist for one chunk of token rows at a time, in forward and again in backward:

* `lm_head` a plain `nn.Linear` (or a weight tensor): a custom autograd function keeps only the hidden rows, the
  targets and one log-sum-exp per row, and recomputes each chunk's logits in backward to form
  `d logp / d logits = onehot - softmax` directly. Extra memory ~ chunk_tokens x vocab x 6 bytes (bf16 logits + fp32).
* any other head (a PEFT-wrapped `lm_head`, a quantised linear): `torch.utils.checkpoint` per chunk, so backward
  re-runs the module on that chunk.

Only label positions (labels != -100) get logits at all: prompt and padding rows are dropped before the head.

Logit scaling / soft-capping: no MoE family kllama targets first (DeepSeek-V2/V3, Qwen-MoE, Mixtral, OLMoE) has any,
but some transformers families do (Cohere `logit_scale`, Granite `logits_scaling` as a divisor, HyperCLOVA X
`logits_scaling` as a factor, Gemma-2/3/4 `final_logit_softcapping`); `logit_transform_for(config)` reads them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Bytes one chunk's logits may take (bf16 from the head + the fp32 copy: 6 bytes a logit). A fixed 4,096 rows was
# 2.5 GB at DeepSeek-V2's 102,400 vocab (3.7 GB at Qwen3's 151,936): with the experts streamed under a
# max_gpu_memory cap, that transient at the end of every forward and in every backward sets the step's peak beside
# the resident layers, each of which would save two ~20 ms copies a step (benchmarks/NOTES.md, "Fifth session").
LOGITS_CHUNK_BYTES = 512 * 2**20


def logits_chunk_tokens(vocab_size: int, budget_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Label rows per head chunk so that one chunk's logits stay within `budget_bytes`: 873 at vocab 102,400, 588 at
    151,936, never fewer than 256 rows (a GEMM still large enough to run at speed) nor more than 8,192."""
    return max(256, min(8192, budget_bytes // (6 * max(1, vocab_size))))


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to `lm_head(h)` before the softmax: `softcap * tanh(scale * x / softcap)` (or `scale * x`)."""

    scale: float = 1.0
    softcap: float | None = None


# model_type -> how its config turns into a logit scale. Families not listed use the raw logits.
_SCALE_BY_MODEL_TYPE: dict[str, Callable[[Any], float]] = {
    "cohere": lambda c: float(c.logit_scale),
    "cohere2": lambda c: float(c.logit_scale),
    "cohere2_moe": lambda c: float(c.logit_scale),
    "granite": lambda c: 1.0 / float(c.logits_scaling),
    "granitemoe": lambda c: 1.0 / float(c.logits_scaling),
    "granitemoeshared": lambda c: 1.0 / float(c.logits_scaling),
    "granitemoehybrid": lambda c: 1.0 / float(c.logits_scaling),
    "hyperclovax": lambda c: float(c.logits_scaling),
}


def logit_transform_for(config: Any) -> LogitTransform:
    """The logit scale / soft-cap a transformers model applies after its `lm_head`, read from its config."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", getattr(config, "model_type", ""))
    scale_of = _SCALE_BY_MODEL_TYPE.get(model_type) or _SCALE_BY_MODEL_TYPE.get(getattr(config, "model_type", ""))
    scale = scale_of(text_config) if scale_of else 1.0
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(softcap) if softcap else None)


def _transform_(logits: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    # In place on a fresh fp32 buffer: a [chunk, vocab] temporary less.
    if transform.scale != 1.0:
        logits.mul_(transform.scale)
    if transform.softcap is not None:
        logits.div_(transform.softcap).tanh_().mul_(transform.softcap)
    return logits


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform
) -> torch.Tensor:
    # weight and bias already in hidden's dtype; autocast is off (forward and backward must agree on the dtype)
    raw = F.linear(hidden, weight, bias)  # [n, V]
    logits = raw.float() if raw.dtype != torch.float32 else raw.clone()  # [n, V] fp32, owned
    del raw
    return _transform_(logits, transform)


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(transform(h W^T + b))[target] per row, chunked; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        targets: torch.Tensor,  # [N] int64
        chunk_tokens: int,
        transform: LogitTransform,
    ) -> torch.Tensor:
        n_rows = hidden.shape[0]
        out = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # [N]
        lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # [N]
        w, b = _as_dtype(weight, bias, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_rows, chunk_tokens):
                stop = min(start + chunk_tokens, n_rows)
                logits = _chunk_logits(hidden[start:stop], w, b, transform)  # [n, V]
                picked = logits.gather(1, targets[start:stop, None]).squeeze(1)  # [n]
                # log-sum-exp in place (torch.logsumexp would allocate another [n, V] fp32 buffer)
                top = logits.amax(dim=-1)  # [n]
                lse[start:stop] = top + logits.sub_(top[:, None]).exp_().sum(-1).log_()
                out[start:stop] = picked - lse[start:stop]
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_tokens, ctx.transform = chunk_tokens, transform
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # grad_out [N]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        transform: LogitTransform = ctx.transform
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        grad_h = torch.empty_like(hidden) if need_h else None  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # [V, H]
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None  # [V]
        grad_out = grad_out.float()
        w, b = _as_dtype(weight, bias, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                stop = min(start + ctx.chunk_tokens, hidden.shape[0])
                _backward_chunk(hidden[start:stop], w, b, targets[start:stop], lse[start:stop], grad_out[start:stop],
                                transform, None if grad_h is None else grad_h[start:stop], grad_w, grad_b)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def _as_dtype(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Cast once per call, not per chunk (the head weight is ~vocab x hidden).
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _backward_chunk(
    h: torch.Tensor,  # [n, H]
    w: torch.Tensor,  # [V, H] in h's dtype
    b: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [n]
    lse: torch.Tensor,  # [n] from the forward
    g: torch.Tensor,  # [n] fp32 incoming gradient
    transform: LogitTransform,
    grad_h: torch.Tensor | None,  # [n, H] view to fill
    grad_w: torch.Tensor | None,  # [V, H] fp32 accumulator
    grad_b: torch.Tensor | None,  # [V] fp32 accumulator
) -> None:
    logits = _chunk_logits(h, w, b, transform)  # [n, V] fp32
    # softcap derivative: d(c tanh(x/c))/dx = 1 - (y/c)^2, y the capped logit
    cap_grad = 1 - (logits / transform.softcap) ** 2 if transform.softcap is not None else None
    # d logp[target] / d logits = onehot(target) - softmax, times the incoming gradient; in place on the logits
    d_logits = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # [n, V]
    d_logits[torch.arange(h.shape[0], device=h.device), targets] += g
    if cap_grad is not None:
        d_logits.mul_(cap_grad)
        del cap_grad
    if transform.scale != 1.0:
        d_logits.mul_(transform.scale)
    if grad_b is not None:
        grad_b += d_logits.sum(0)
    d_raw = d_logits.to(h.dtype)  # [n, V], the dtype the forward matmul ran in
    del d_logits
    if grad_h is not None:
        grad_h.copy_(d_raw @ w)
    if grad_w is not None:
        grad_w.add_(d_raw.t() @ h)  # mixed-dtype in-place add: no fp32 [V, H] temporary


def _module_chunk_logps(
    hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, transform: LogitTransform
) -> torch.Tensor:
    logits = _transform_(head(hidden).float(), transform)  # [n, V]
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)  # [n]


def token_logps(
    hidden: torch.Tensor,  # [N, H]
    lm_head: nn.Module | torch.Tensor,  # module, or its weight [V, H]
    targets: torch.Tensor,  # [N] int64, all valid
    *,
    chunk_tokens: int = 4096,
    transform: LogitTransform | None = None,
) -> torch.Tensor:
    """fp32 log-probability of each target under `lm_head(hidden)`, `[N]`, never holding more than one chunk of logits.

    A plain `nn.Linear` or a weight tensor goes through the custom autograd function (gradients for hidden, weight
    and bias); any other module is checkpointed per chunk. Log-sum-exp runs in fp32 whatever the input dtype.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    transform = transform or LogitTransform()
    if isinstance(lm_head, torch.Tensor) or type(lm_head) is nn.Linear:
        weight = lm_head if isinstance(lm_head, torch.Tensor) else lm_head.weight
        bias = None if isinstance(lm_head, torch.Tensor) else lm_head.bias
        return _LinearTokenLogps.apply(hidden, weight, bias, targets, chunk_tokens, transform)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_module_chunk_logps, h, t, lm_head, transform, use_reentrant=False))
        else:
            pieces.append(_module_chunk_logps(h, t, lm_head, transform))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def ld_token_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO token weights `[B, T]` for a batch laid out as `[chosen; rejected]` (row i pairs with row i + B/2).

    The first `min(len_chosen, len_rejected)` label tokens of each response weigh 1, the tokens past that length
    weigh `alpha`, masked positions 0 (Liu et al. 2024, "length desensitisation"). Tokens are counted in order of
    the label mask, which equals LLaMA-Factory's position-based cut for contiguous responses. Apply it to the policy
    only; LLaMA-Factory computes the reference log-probs without it.
    """
    if mask.shape[0] % 2:
        raise ValueError(f"ld_alpha needs a [chosen; rejected] batch of even size, got {mask.shape[0]} rows")
    flat = mask.reshape(-1).nonzero().squeeze(1)  # [N] label tokens, row-major
    weights = torch.zeros(mask.numel(), dtype=torch.float32, device=mask.device)  # [B*T]
    weights[flat] = label_ld_weights(flat // mask.shape[1], mask.sum(-1), alpha)
    return weights.reshape(mask.shape)


def label_ld_weights(owner: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO weights `[N]` of a batch's label tokens in order, `owner` `[N]` the (non-decreasing) sequence of each
    and `counts` `[S]` the label tokens of each sequence, the sequences laid out `[chosen; rejected]`
    (`ld_token_weights` for padded rows; packed rows use it directly)."""
    half = counts.shape[0] // 2
    shared = torch.minimum(counts[:half], counts[half:]).repeat(2)  # [S]
    starts = counts.cumsum(0) - counts  # [S] flat index of each sequence's first label token
    rank = torch.arange(owner.shape[0], device=owner.device) - starts[owner] + 1  # [N] 1-based within its sequence
    return torch.where(rank <= shared[owner], 1.0, float(alpha))  # [N]


def sequence_logps(
    hidden_states: torch.Tensor,  # [B, T, H], the final hidden states (after the last norm)
    lm_head: nn.Module | torch.Tensor,  # module, or its weight [V, H]
    labels: torch.Tensor,  # [B, T], IGNORE_INDEX (-100) where masked; unshifted, like transformers' labels
    *,
    chunk_tokens: int = 4096,
    ld_alpha: float | None = None,
    transform: LogitTransform | None = None,
    sequence_index: torch.Tensor | None = None,  # [B, T] packed rows: the sequence each token belongs to
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log p(label) of each sequence and its number of label tokens: `(sum_logps [S] float64, num_tokens [S])`.

    Labels are shifted inside (position t predicts label t+1), as transformers' causal-LM loss does. Only label
    rows reach the head, in chunks of `chunk_tokens` (see module docstring). A sequence is a row (S = B), or with
    `sequence_index` (packed rows, `kllama.data.collate.pack_batch`: non-decreasing along the flattened rows) the
    tokens of one index (S = its largest value + 1); a token is counted for the sequence of the position it is the
    label of. `ld_alpha` (LD-DPO) down-weights the tokens of the longer response past the shorter one's length, for
    `[chosen; rejected]` sequences; `num_tokens` stays the unweighted count, so `sum_logps / num_tokens` is the
    average used by ipo / orpo / simpo.
    """
    if hidden_states.shape[:2] != labels.shape:
        shapes = f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)}"
        raise ValueError(f"{shapes} disagree on [B, T]")
    batch, _, width = hidden_states.shape
    shifted = labels[:, 1:]  # [B, T-1]
    mask = shifted != IGNORE_INDEX  # [B, T-1]
    flat = mask.reshape(-1).nonzero().squeeze(1)  # [N] indices of label tokens
    rows = flat // shifted.shape[1]  # [N] which row each belongs to
    # position t of row b predicts shifted label t: row b*T + t of the [B*T, H] view (no copy of all positions)
    hidden = hidden_states.reshape(-1, width).index_select(0, flat + rows)  # [N, H]
    targets = shifted.reshape(-1).index_select(0, flat)  # [N]
    if sequence_index is None:
        owner, sequences = rows, batch
    else:
        owner = sequence_index[:, 1:].reshape(-1).index_select(0, flat)  # [N]
        sequences = int(sequence_index.max()) + 1 if sequence_index.numel() else 0
    counts = torch.zeros(sequences, dtype=torch.long, device=labels.device).index_add(
        0, owner, torch.ones_like(owner))  # [S]
    logps = token_logps(hidden, lm_head, targets, chunk_tokens=chunk_tokens, transform=transform)  # [N]
    if ld_alpha is not None:
        if sequences % 2:
            raise ValueError(f"ld_alpha needs [chosen; rejected] sequences, an even number, got {sequences}")
        logps = logps * label_ld_weights(owner, counts, ld_alpha)
    # Accumulated in float64: a 2,000-token sum in fp32 is off by ~3e-5 relative, as large as the log-ratio
    # differences DPO works with (autocast never touches float64, and the gradient flows back in fp32).
    sums = torch.zeros(sequences, dtype=torch.float64, device=logps.device).index_add(0, owner, logps.double())  # [S]
    return sums, counts
