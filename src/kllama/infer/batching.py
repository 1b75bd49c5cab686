"""One decoding step over many sequences: pack their new tokens, run one forward, choose each one's next token.

Sequences that are decoding feed their last token; sequences still reading their prompt share a prefill budget
(`prefill_tokens` per step, oldest first), so a long newcomer is read in chunks while the others keep streaming.
All of it goes through the model as one packed row, so the expert engine places its experts for the step's whole
token count (a big batch may run them on the GPU where a single token would run on the CPU). Each sequence keeps its
own sampling settings, seed, stop strings and budget; a cancelled one leaves at the step boundary.
"""
from __future__ import annotations

import inspect
import logging
from collections import Counter

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from kllama.errors import KllamaError
from kllama.infer.kv_cache import BOOL_MASK_ATTENTION, PagedKVCache, StepPlan
from kllama.infer.sampling import NonFiniteLogitsError, sample_rows
from kllama.infer.sequence import Sequence

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = 512


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside `model` (itself, or the one a PEFT wrapper holds)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise KllamaError(f"{type(model).__name__} holds no transformers model; give a transformers causal LM")


def sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window every layer of the model uses (None = full attention); models mixing windowed and full
    layers are refused, since one packed mask serves every layer."""
    kinds = set(getattr(config, "layer_types", None) or ())
    if len(kinds) > 1:
        raise KllamaError(f"model type {config.model_type!r} mixes attention kinds {sorted(kinds)}; kllama's batched "
                          "decoding needs every layer to attend alike. Serve it with infer_backend: huggingface "
                          "through another server, or set use_sliding_window: false in its config.json")
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def cache_argument(model: PreTrainedModel) -> str:
    """The forward keyword that takes the KV cache: `cache` (transformers >= 5.24) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class BatchDecoder:
    """Steps any set of sequences forward through one model and its paged KV cache."""

    def __init__(self, model: nn.Module, device: torch.device, stats: Counter[str] | None = None) -> None:
        self.model = model
        self.device = device
        self.stats: Counter[str] = stats if stats is not None else Counter()
        hf = transformers_model(model)
        attention = hf.config._attn_implementation
        if attention not in BOOL_MASK_ATTENTION:
            # Packed sequences need an explicit mask, which flash-attention kernels do not take.
            logger.warning("attention %r takes no custom mask; batched decoding switches the model to sdpa", attention)
            hf.set_attn_implementation("sdpa")
            attention = "sdpa"
        self.cache = PagedKVCache(device, bool_mask=BOOL_MASK_ATTENTION[attention], mask_dtype=hf.dtype,
                                  sliding_window=sliding_window(hf.config))
        self._cache_kw = cache_argument(hf)

    def step(self, seqs: list[Sequence], prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> list[Sequence]:
        """Advance `seqs` (in arrival order) by one forward; returns the sequences that ended (finished, cancelled
        or failed), whose cache is freed. An error of the forward fails the step's sequences, not the caller."""
        ended = [seq for seq in seqs if seq.done]
        live = []
        for seq in seqs:
            if seq.done:
                continue
            if seq.cancel.is_set():
                seq.cancelled()
                self.stats["cancelled"] += 1
                ended.append(seq)
            else:
                live.append(seq)
        fed, segments, ids = [], [], []
        budget = prefill_tokens
        for seq in sorted(live, key=lambda s: s.prefilling):  # decoding first; the sort keeps arrival order
            prefilling = seq.prefilling
            if prefilling and budget <= 0:
                continue
            taken = seq.take(budget if prefilling else 1)
            budget -= len(taken) if prefilling else 0
            fed.append(seq)
            segments.append((seq.seq_id, len(taken)))
            ids.extend(taken)
        if fed:
            ended.extend(self._forward(fed, segments, ids))
        for seq in ended:
            self.cache.free(seq.seq_id)
        return ended

    def adopt(self, seq: Sequence, cached: list[int], chunk: int = DEFAULT_PREFILL_TOKENS) -> bool:
        """Take over `seq`, whose `cached` ids (its prompt so far, or its prompt and answer) another decoder held:
        they are read into this cache in chunks of `chunk` tokens (one prefill, logits unused), after which `seq`
        steps here like any other. A failed forward fails `seq` (and frees what it cached); returns success."""
        try:
            for start in range(0, len(cached), chunk):
                part = cached[start:start + chunk]
                plan = self.cache.plan([(seq.seq_id, len(part))])
                with torch.inference_mode():
                    self._run(part, plan, plan.last_index)
                self.cache.commit()
        except Exception as exc:  # noqa: BLE001 - as a failed step: this sequence gets the error, the server serves on
            self.cache.abort()
            self.cache.free(seq.seq_id)
            logger.exception("moving sequence %d into the batch failed (%d tokens)", seq.seq_id, len(cached))
            seq.fail(exc)
            return False
        return True

    def _run(self, ids: list[int], plan: StepPlan, keep: Tensor) -> Tensor:
        """Logits `[len(keep), V]` of the packed forward of `ids` under `plan` (the cache is not committed)."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), position_ids=plan.position_ids,
                         attention_mask=plan.attention_mask, use_cache=True, logits_to_keep=keep,
                         **{self._cache_kw: self.cache})
        return out.logits[0]

    def _forward(self, fed: list[Sequence], segments: list[tuple[int, int]], ids: list[int]) -> list[Sequence]:
        choosing = [i for i, seq in enumerate(fed) if not seq.pending]  # fully fed: their next token is due
        try:
            plan = self.cache.plan(segments)
            keep = plan.last_index if len(choosing) == len(fed) else \
                plan.last_index[torch.tensor(choosing, dtype=torch.long, device=self.device)]
            with torch.inference_mode():
                logits = self._run(ids, plan, keep)
                self.cache.commit()
                tokens, finite = sample_rows(logits, [fed[i].sampler for i in choosing])
        except Exception as exc:  # noqa: BLE001 - the step's requests get the error; the server keeps serving
            self.cache.abort()
            logger.exception("decoding step failed (%d sequences, %d tokens)", len(fed), len(ids))
            for seq in fed:
                seq.fail(exc)
            return fed
        count_step(self.stats, len(fed), len(ids))
        return accept_tokens([fed[i] for i in choosing], tokens, finite, self.stats)


def count_step(stats: Counter[str], sequences: int, tokens: int) -> None:
    """Record one forward of `sequences` sequences and `tokens` tokens in the engine's counters."""
    stats["steps"] += 1
    stats["max_batch"] = max(stats["max_batch"], sequences)
    stats["max_step_tokens"] = max(stats["max_step_tokens"], tokens)


def accept_tokens(seqs: list[Sequence], tokens: list[int], finite: list[bool], stats: Counter[str]) -> list[Sequence]:
    """Hand each sequence the token chosen for it (`finite` False: its logits were not, so it fails instead);
    returns the sequences that ended. A sequence failing on its token (e.g. a tokenizer error) ends alone."""
    ended = []
    for seq, token, ok in zip(seqs, tokens, finite):
        before = seq.produced
        try:
            if ok:
                seq.accept(token)
            else:
                seq.fail(NonFiniteLogitsError(
                    f"the model produced NaN or infinite logits at answer token {seq.produced + 1}, so no token can "
                    "be chosen; its weights or adapter are broken (check adapter_name_or_path, or serve with "
                    "infer_dtype: float32)"))
        except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failing to decode: only this sequence ends
            logger.exception("sequence %d failed after its token", seq.seq_id)
            seq.fail(exc)
        stats["generated_tokens"] += seq.produced - before
        if seq.done:
            ended.append(seq)
    return ended
