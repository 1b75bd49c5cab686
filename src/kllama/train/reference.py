"""`precompute_ref_log_probs`: the reference model's log-probs for a whole dataset, computed once and cached.

Training then runs no reference passes at all: with the expert engine that is one fewer streaming pass over every
expert per micro-step (docs/design.md: ~0.53 s each on DeepSeek-V2-Lite).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from kllama.model.adapters import adapter_state_dict, adapters_disabled
from kllama.train.distributed import gather_objects, is_main_process, my_share
from kllama.train.micro_batching import chunk_rows, row_lengths
from kllama.train.trainer import PreferenceSettings, policy_logps


def _cache_key(model: nn.Module, dataset: Dataset, settings: PreferenceSettings, with_start_adapter: bool) -> str:
    lm_config = getattr(model, "config", None)
    parts = {
        "dataset": getattr(dataset, "_fingerprint", None) or str(len(dataset)),
        "model": getattr(lm_config, "_name_or_path", None),
        "rows": len(dataset),
    }
    if with_start_adapter:
        digest = hashlib.sha256()
        for name, tensor in sorted(adapter_state_dict(model).items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())  # adapters live on the GPU there
        parts["adapter"] = digest.hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def attach_reference_logps(model: nn.Module, dataset: Dataset, collate: Callable[[list[dict]], dict[str, Any]],
                           settings: PreferenceSettings,
                           reference_context: Callable[[], contextlib.AbstractContextManager] | None,
                           cache_dir: str | Path, *, batch_size: int, device: torch.device,
                           token_budget: int | None = None) -> Dataset:
    """Return `dataset` with `ref_chosen_logps` / `ref_rejected_logps` columns (summed log-probs of the reference),
    loading them from `cache_dir` when this dataset + model + reference were computed before.

    Rows run `batch_size` at a time in dataset order, or -- with a `token_budget` (experts held in host RAM, where
    every pass pays the weights' copy) -- longest first in passes of at most that many padded tokens. In a
    data-parallel run each rank computes every world_size-th pass and the ranks exchange their results; rank 0's
    cache decides for all (other nodes may not share its filesystem) and rank 0 writes it."""
    key = _cache_key(model, dataset, settings, reference_context is not None)
    cache = Path(cache_dir) / "reference_logps" / f"{key}.pt"
    saved = torch.load(cache, weights_only=True) if is_main_process() and cache.is_file() else None
    saved = gather_objects(saved)[0]
    if saved is not None:
        print(f"reference log-probs: loaded from cache {cache}", flush=True)
    else:
        n = len(dataset)
        if token_budget:
            groups = chunk_rows(row_lengths(dataset, "dpo"), 2, token_budget)
            print(f"reference log-probs: {n} pairs in {len(groups)} passes of up to {token_budget:,} tokens",
                  flush=True)
        else:
            groups = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
        mine: dict[int, tuple[float, float]] = {}  # row -> (chosen, rejected) of this rank's passes
        was_training = model.training
        model.eval()
        context = reference_context or (lambda: adapters_disabled(model))
        with torch.no_grad(), context():
            for group in tqdm(my_share(groups), desc="reference log-probs", unit="batch",
                              disable=not is_main_process()):
                batch = {k: v.to(device) if torch.is_tensor(v) else v
                         for k, v in collate([dataset[i] for i in group]).items()}
                sums, _, _ = policy_logps(model, batch, PreferenceSettings(stage="dpo", ld_alpha=None))
                sums = sums.double().cpu().tolist()  # float64, as summed
                for j, i in enumerate(group):
                    mine[i] = (sums[j], sums[len(group) + j])
        model.train(was_training)
        chosen, rejected = [0.0] * n, [0.0] * n
        for part in gather_objects(mine):
            for i, (chosen_logp, rejected_logp) in part.items():
                chosen[i], rejected[i] = chosen_logp, rejected_logp
        saved = {"chosen": chosen, "rejected": rejected}
        if is_main_process():
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save(saved, tmp)
            tmp.replace(cache)
    return dataset.add_column("ref_chosen_logps", saved["chosen"]).add_column("ref_rejected_logps", saved["rejected"])


def with_reference_columns(collate: Callable[[list[dict]], dict[str, Any]]) -> Callable[[list[dict]], dict[str, Any]]:
    """`collate` for rows carrying `ref_chosen_logps` / `ref_rejected_logps`: the batch gets them as `[B]` fp32
    tensors in row order, so they follow their rows through any sampler or micro-batch merge."""
    def collate_with_reference(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate([{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows])
        batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float64)
        batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float64)
        return batch

    return collate_with_reference
