"""`precompute_ref_log_probs`: the reference model's log-probs for a whole dataset, computed once and cached.

Training then runs no reference passes at all: with the expert engine that is one fewer streaming pass over every
expert per micro-step (docs/design.md: ~0.53 s each on DeepSeek-V2-Lite).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from kllama.errors import KllamaError
from kllama.model.adapters import adapter_state_dict, adapters_disabled
from kllama.train.distributed import gather_objects, is_main_process, my_share
from kllama.train.micro_batching import chunk_rows, row_lengths
from kllama.train.trainer import PreferenceSettings, policy_logps


def weights_identity(model_dir: str | Path, expert_dtype: str) -> dict[str, Any]:
    """What makes the reference model's numbers besides the adapter: the checkpoint's files (name, size,
    modification time: a checkpoint rewritten at the same path is another model) and the routed experts' dtype
    (`expert_dtype: int8` and `fp8` are other weights than the checkpoint's bf16)."""
    files = sorted(f for f in Path(model_dir).iterdir()
                   if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"))
    return {"expert_dtype": expert_dtype,
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _cache_key(model: nn.Module, dataset: Dataset, with_start_adapter: bool, weights: dict[str, Any] | None) -> str:
    lm_config = getattr(model, "config", None)
    parts = {
        "dataset": getattr(dataset, "_fingerprint", None) or str(len(dataset)),
        "model": getattr(lm_config, "_name_or_path", None),
        "rows": len(dataset),
        "weights": weights,
    }
    if with_start_adapter:
        digest = hashlib.sha256()
        for name, tensor in sorted(adapter_state_dict(model).items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())  # adapters live on the GPU there
        parts["adapter"] = digest.hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


Logps = tuple[float, float]  # (chosen, rejected) summed reference log-probs of one pair


def _pass_logps(model: nn.Module, dataset: Dataset, collate: Callable[[list[dict]], dict[str, Any]],
                group: list[int], device: torch.device) -> tuple[dict[int, Logps], tuple[int, int]]:
    """The reference log-probs of the pairs `group` (row indices) run as one pass, and the pass's
    `[rows, tokens]` (packed: one row of real tokens)."""
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([dataset[i] for i in group]).items()}
    sums, _, _ = policy_logps(model, batch, PreferenceSettings(stage="dpo", ld_alpha=None))
    sums = sums.double().cpu().tolist()  # float64, as summed; [chosen of group; rejected of group]
    values = {i: (sums[j], sums[len(group) + j]) for j, i in enumerate(group)}
    return values, tuple(batch["input_ids"].shape)


def _finite(values: Logps) -> bool:
    return all(math.isfinite(v) for v in values)


def _finite_pass_logps(model: nn.Module, dataset: Dataset, collate: Callable[[list[dict]], dict[str, Any]],
                       group: list[int], device: torch.device) -> dict[int, Logps]:
    """`_pass_logps` of `group`; a pass of several pairs that returns a non-finite value runs again as two halves
    (recursively), unless its first such pair is non-finite alone too (then the pair or the weights are at fault,
    and the values go back as they are, for the caller to report).

    A pair's log-probs do not depend on the other rows of its pass, so a non-finite value that the pair alone does
    not give is the pass's size failing. Issue #11 (H200, bf16, sdpa): the precompute's one pass at 32 x 2,048
    tokens (65,536 tokens, 2^31 attention scores: both exactly at a 32-bit edge) held the only pairs whose first
    training step went NaN, while training's smaller passes of the same pairs stayed finite. The whole pass runs
    again, not only its non-finite rows: a kernel that failed there may have returned wrong finite values for the
    others."""
    values, shape = _pass_logps(model, dataset, collate, group, device)
    bad = [i for i in group if not _finite(values[i])]
    if not bad or len(group) == 1:
        return values
    alone, _ = _pass_logps(model, dataset, collate, bad[:1], device)
    if not _finite(alone[bad[0]]):
        return {**values, **alone}
    half = (len(group) + 1) // 2
    tqdm.write(f"reference log-probs: a pass of {len(group)} pairs ({shape[0]} x {shape[1]:,} tokens) gave "
               f"non-finite log-probs for {len(bad)} of them (pair {bad[0]} alone: finite); running it again as "
               f"passes of {half} and {len(group) - half} pairs")
    return {**_finite_pass_logps(model, dataset, collate, group[:half], device),
            **_finite_pass_logps(model, dataset, collate, group[half:], device)}


def _non_finite_pairs(saved: dict[str, list[float]]) -> list[int]:
    return [i for i, pair in enumerate(zip(saved["chosen"], saved["rejected"])) if not _finite(pair)]


def _refuse_non_finite(saved: dict[str, list[float]], bad: list[int], split: str) -> None:
    first = bad[0]
    more = f" (and {len(bad) - 1} more: {', '.join(map(str, bad[1:6]))}{', ...' if len(bad) > 6 else ''})" \
        if len(bad) > 1 else ""
    raise KllamaError(
        f"precompute_ref_log_probs: the reference log-probs of {split} pair {first}{more} are not finite "
        f"(chosen {saved['chosen'][first]}, rejected {saved['rejected'][first]}), even with the pair alone in its "
        "pass, so training would stop with a NaN loss; nothing was cached. Usual causes: NaN/inf values in the model "
        "weights or in the starting adapter (adapter_name_or_path), or fp16 overflow (use bf16). Check that pair's "
        "row in the dataset, and the weights."
    )


def attach_reference_logps(model: nn.Module, dataset: Dataset, collate: Callable[[list[dict]], dict[str, Any]],
                           reference_context: Callable[[], contextlib.AbstractContextManager] | None,
                           cache_dir: str | Path, *, batch_size: int, device: torch.device,
                           token_budget: int | None = None, split: str = "train", packed: bool = False,
                           shared: bool = False, weights: dict[str, Any] | None = None) -> Dataset:
    """Return `dataset` with `ref_chosen_logps` / `ref_rejected_logps` columns (summed log-probs of the reference),
    loading them from `cache_dir` when this dataset + model + reference were computed before (`weights`:
    `weights_identity` of the model the run loaded).

    Rows run `batch_size` at a time in dataset order, or -- with a `token_budget` (experts held in host RAM, where
    every pass pays the weights' copy) -- longest first in passes of at most that many tokens (real ones with
    `packed`: `collate` packs; the ones computed with `shared`: it computes each pair's prompt once). In a
    data-parallel run each rank computes every world_size-th pass and the ranks exchange their results; rank 0's
    cache decides for all (other nodes may not share its filesystem) and rank 0 writes it.

    Every value is finite: a pass that returns a non-finite value runs again in smaller passes
    (`_finite_pass_logps`), a pair still non-finite alone raises `KllamaError` naming it (`split` says which
    dataset) before anything is cached, and a cache holding non-finite values is computed again."""
    key = _cache_key(model, dataset, reference_context is not None, weights)
    cache = Path(cache_dir) / "reference_logps" / f"{key}.pt"
    saved = torch.load(cache, weights_only=True) if is_main_process() and cache.is_file() else None
    saved = gather_objects(saved)[0]
    if saved is not None and _non_finite_pairs(saved):
        print(f"reference log-probs: cache {cache} holds non-finite values (pair {_non_finite_pairs(saved)[0]}); "
              "computing them again", flush=True)
        saved = None
    if saved is not None:
        print(f"reference log-probs: loaded from cache {cache}", flush=True)
    else:
        n = len(dataset)
        if token_budget:
            groups = chunk_rows(row_lengths(dataset, "dpo", packed, shared), 2, token_budget, packed)
            kind = " real (packed)" if packed else ""
            print(f"reference log-probs: {n} pairs in {len(groups)} passes of up to {token_budget:,}{kind} tokens",
                  flush=True)
        else:
            groups = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
        mine: dict[int, Logps] = {}  # row -> (chosen, rejected) of this rank's passes
        was_training = model.training
        model.eval()
        context = reference_context or (lambda: adapters_disabled(model))
        with torch.no_grad(), context():
            for group in tqdm(my_share(groups), desc="reference log-probs", unit="batch",
                              disable=not is_main_process()):
                values = _finite_pass_logps(model, dataset, collate, group, device)
                mine.update(values)
                if not all(map(_finite, values.values())):
                    break  # a pair non-finite alone: reported below, after every rank has stopped
        model.train(was_training)
        chosen, rejected = [0.0] * n, [0.0] * n
        for part in gather_objects(mine):
            for i, (chosen_logp, rejected_logp) in part.items():
                chosen[i], rejected[i] = chosen_logp, rejected_logp
        saved = {"chosen": chosen, "rejected": rejected}
        if bad := _non_finite_pairs(saved):  # every rank holds the same values: all raise, none waits
            _refuse_non_finite(saved, bad, split)
        if is_main_process():
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save(saved, tmp)
            tmp.replace(cache)
    return dataset.add_column("ref_chosen_logps", saved["chosen"]).add_column("ref_rejected_logps", saved["rejected"])


def with_reference_columns(collate: Callable[[list[dict]], dict[str, Any]]) -> Callable[[list[dict]], dict[str, Any]]:
    """`collate` for rows carrying `ref_chosen_logps` / `ref_rejected_logps`: the batch gets them as `[B]` float64
    tensors in row order, so they follow their rows through any sampler or micro-batch merge."""
    def collate_with_reference(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate([{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows])
        batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float64)
        batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float64)
        return batch

    return collate_with_reference
