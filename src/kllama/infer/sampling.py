"""Sampling parameters and next-token selection for one decoding step.

The logits processors are transformers' own (repetition penalty, temperature, top-k, top-p), so `kllama chat` and
`kllama api` sample exactly as `model.generate` would with the same settings; only the loop around them is ours.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kllama.errors import KllamaError


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is generated. `temperature == 0` or `do_sample=False` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0
    do_sample: bool = True
    stop: tuple[str, ...] = ()  # stop strings: the answer ends before the first one
    seed: int | None = None
    ignore_eos: bool = False  # keep going past the end-of-turn token (benchmarks, tests)

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return not self.do_sample or self.temperature == 0.0

    def updated(self, **changes: Any) -> "SamplingParams":
        """A copy with the given fields replaced, ignoring None values (unset request fields keep the defaults)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def check_sampling(params: SamplingParams) -> None:
    """Raise KllamaError naming the first out-of-range field of `params`."""
    problems = {
        "max_new_tokens must be >= 1": params.max_new_tokens < 1,
        "temperature must be >= 0": params.temperature < 0,
        "top_p must be in (0, 1]": not 0.0 < params.top_p <= 1.0,
        "top_k must be >= 0": params.top_k < 0,
        "repetition_penalty must be > 0": params.repetition_penalty <= 0,
    }
    for message, bad in problems.items():
        if bad:
            raise KllamaError(f"{message} (got {params})")


def build_logits_processor(params: SamplingParams) -> LogitsProcessorList:
    """transformers' processors for `params`, in `generate`'s order (penalty first, then the sampling warpers)."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.greedy:
        return procs
    if params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        procs.append(TopKLogitsWarper(params.top_k, min_tokens_to_keep=1))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p, min_tokens_to_keep=1))
    return procs


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator when the request gives a seed (reproducible sampling), else None (global RNG)."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def select_next_tokens(
    logits: torch.Tensor,  # [B, V] logits of the last position
    seen_ids: torch.Tensor,  # [B, T] prompt + generated ids (for the repetition penalty)
    params: SamplingParams,
    processors: LogitsProcessorList,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [B]
    """Pick the next token of each row: argmax when greedy, else a draw from the processed distribution."""
    scores = processors(seen_ids, logits.float())  # [B, V]
    if params.greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)  # [B, V]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class NonFiniteLogitsError(KllamaError):
    """The model produced NaN or infinite logits, so no token can be chosen (broken weights or adapter)."""

    code = "non_finite_logits"


@dataclass
class RowSampler:
    """How one row of a batch picks its token: its settings, transformers' processors, its seeded generator and the
    ids it has seen (`[1, T]`, read by the repetition penalty only)."""

    params: SamplingParams
    processors: LogitsProcessorList
    generator: torch.Generator | None
    seen_ids: torch.Tensor

    @property
    def plain_argmax(self) -> bool:
        """Greedy without any processor: the row's token is the argmax of its raw logits."""
        return self.params.greedy and len(self.processors) == 0


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSampler]) -> tuple[list[int], list[bool]]:
    """The next token of each row of `logits [R, V]` under that row's own settings, and whether the row's logits
    were all finite (a row that was not gets an arbitrary token, to be discarded). One host sync for the batch."""
    logits = logits.float()
    finite = torch.isfinite(logits).all(dim=-1)  # [R]
    safe = torch.where(finite[:, None], logits, torch.zeros((), device=logits.device))  # NaN rows cannot break a draw
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)  # [R]
    plain = [i for i, row in enumerate(rows) if row.plain_argmax]
    if len(plain) == len(rows):
        tokens = safe.argmax(dim=-1)
    elif plain:
        index = torch.tensor(plain, device=logits.device)
        tokens[index] = safe.index_select(0, index).argmax(dim=-1)
    for i, row in enumerate(rows):
        if not row.plain_argmax:
            tokens[i : i + 1] = select_next_tokens(safe[i : i + 1], row.seen_ids, row.params, row.processors,
                                                   row.generator)
    picked, ok = torch.stack([tokens, finite.long()]).tolist()
    return picked, [bool(flag) for flag in ok]
