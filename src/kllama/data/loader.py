"""`build_dataset`: registered names -> validated canonical rows -> tokenized train/eval datasets + summary."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from kllama.data import cache as cache_mod
from kllama.data.formats import CONVERTERS, REQUIRED_COLUMNS, RowProblem
from kllama.data.readers import RowError, list_files, read_file
from kllama.data.registry import DatasetEntry, resolve_datasets
from kllama.data.summary import DataSummary, percentiles
from kllama.data.templates import Template
from kllama.data.tokenize_pairs import TOKENIZERS, has_response
from kllama.errors import KllamaError

MAX_LISTED_ERRORS = 10
MIN_ROWS_PER_WORKER = 500  # below this, starting worker processes costs more than tokenizing in-process


@dataclass
class DatasetBundle:
    """Tokenized training rows, optional evaluation rows (both `datasets.Dataset`), and the summary to print."""

    train: object | None
    eval: object | None
    summary: DataSummary


def build_dataset(
    data_args, tokenizer, template: Template, *, stage: str, seed: int, cache_dir: str | Path | None = None
) -> DatasetBundle:
    """Load `data_args.dataset` (and `eval_dataset`), validate and tokenize them for `stage` ("sft" | "dpo").

    dpo rows: `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels` (prompt + answer, labels
    -100 on the prompt); sft rows: `input_ids`, `labels`. `val_size` splits off a seeded evaluation set unless
    `eval_dataset` is given. With `cache_dir`, tokenized rows are cached under a key of files + tokenizer +
    template + cutoff_len (+ options) and a later call with the same inputs skips reading and tokenizing
    (`overwrite_cache` forces a rebuild). Invalid rows raise a KllamaError listing them (file, row, problem), or
    are dropped and counted with `skip_invalid_rows`.
    """
    if stage not in TOKENIZERS:
        raise KllamaError(f"unknown stage {stage!r}; choose one of {', '.join(TOKENIZERS)}")
    if not data_args.dataset:
        raise KllamaError("no dataset given: set `dataset` to names registered in <dataset_dir>/dataset_info.json")
    template = template.with_options(enable_thinking=data_args.enable_thinking, default_system=data_args.default_system)
    train_entries = resolve_datasets(data_args.dataset, data_args.dataset_dir)
    eval_entries = resolve_datasets(data_args.eval_dataset, data_args.dataset_dir) if data_args.eval_dataset else []
    for entry in train_entries + eval_entries:
        _check_stage(entry, stage)

    summary = DataSummary(stage=stage, datasets=[e.name for e in train_entries], template=template.name,
                          cutoff_len=data_args.cutoff_len)
    key = None
    if cache_dir is not None:
        files = [f for e in train_entries + eval_entries for f in list_files(e.path)]
        options = {"stage": stage, "cutoff_len": data_args.cutoff_len, "max_samples": data_args.max_samples,
                   "skip_invalid_rows": data_args.skip_invalid_rows, "seed": seed,
                   "eval": [e.name for e in eval_entries]}
        key = cache_mod.cache_key(entries=train_entries + eval_entries, files=files, tokenizer=tokenizer,
                                  template=template, options=options)
    cached = cache_mod.load_cached(cache_dir, key) if key and not data_args.overwrite_cache else None
    if cached is not None:
        pools, stats = cached
        summary.from_cache = True
    else:
        pools, stats = _build_pools(train_entries, eval_entries, data_args, tokenizer, template, stage, seed)
        if key:
            cache_mod.save_cached(cache_dir, key, pools, stats)
    for name in ("dropped", "dropped_reasons", "truncated", "lengths"):
        setattr(summary, name, stats[name])

    train, eval_ = pools["train"], pools["eval"] if "eval" in pools else None
    if eval_ is None and data_args.val_size:
        train, eval_ = _split(train, data_args.val_size, seed)
    summary.rows = len(train)
    summary.eval_rows = len(eval_) if eval_ is not None else 0
    return DatasetBundle(train=train, eval=eval_, summary=summary)


def _check_stage(entry: DatasetEntry, stage: str) -> None:
    is_pairs = entry.ranking or entry.formatting == "trl" and stage == "dpo"
    if stage == "dpo" and not is_pairs:
        raise KllamaError(f"dataset {entry.name!r} is not a preference dataset (no `ranking: true` in its "
                          "dataset_info.json entry); stage dpo needs chosen/rejected pairs")
    if stage == "sft" and entry.ranking:
        raise KllamaError(f"dataset {entry.name!r} is a preference (ranking) dataset; stage sft needs instruction "
                          "or conversation data (or use stage: dpo)")


def _split(train, val_size: float, seed: int):
    n = len(train)
    count = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if count < 1 or count >= n:
        raise KllamaError(f"val_size {val_size} leaves {n - count} training and {count} evaluation rows out of {n}; "
                          "use a fraction in (0, 1) or a row count between 1 and the number of rows - 1")
    parts = train.train_test_split(test_size=count, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _build_pools(train_entries, eval_entries, data_args, tokenizer, template, stage, seed):
    """Tokenize the train (and eval) datasets; returns (DatasetDict, stats dict)."""
    import datasets

    stats = {"dropped": 0, "dropped_reasons": {}, "truncated": 0, "lengths": {}}
    pools = {}
    all_lengths: list[int] = []
    for split, entries in (("train", train_entries), ("eval", eval_entries)):
        if not entries:
            continue
        rows, invalid = _canonical_rows(entries, data_args, stage, seed)
        _count(stats, "invalid row", invalid)
        if not rows:
            raise KllamaError(f"no usable rows in {', '.join(e.name for e in entries)}")
        ds = datasets.Dataset.from_list(rows)
        workers = data_args.preprocessing_num_workers or 1
        workers = min(workers, len(ds) // MIN_ROWS_PER_WORKER)
        ds = ds.map(
            TOKENIZERS[stage], fn_kwargs={"tokenizer": tokenizer, "template": template, "cutoff_len": data_args.cutoff_len},
            remove_columns=ds.column_names, num_proc=workers if workers > 1 else None,
        )
        before = len(ds)
        ds = ds.filter(has_response)
        _count(stats, "no response token left within cutoff_len", before - len(ds))
        stats["truncated"] += sum(ds["truncated"])
        all_lengths += ds["num_tokens"]
        pools[split] = ds.remove_columns(["num_tokens", "truncated"])
    stats["lengths"] = percentiles(all_lengths)
    return datasets.DatasetDict(pools), stats


def _count(stats: dict, reason: str, n: int) -> None:
    if n:
        stats["dropped"] += n
        stats["dropped_reasons"][reason] = stats["dropped_reasons"].get(reason, 0) + n


def _canonical_rows(entries: list[DatasetEntry], data_args, stage: str, seed: int) -> tuple[list[dict], int]:
    """Read, select (max_samples, num_samples) and convert every row; invalid rows raise or are counted."""
    rows, errors, column_problems = [], [], []
    for entry in entries:
        labelled = []  # (file, row label, raw row)
        for file in list_files(entry.path):
            fr = read_file(file, entry.split)
            errors += fr.errors
            needed = set(REQUIRED_COLUMNS[(entry.formatting, stage)]) | set(entry.explicit_columns)
            for key in sorted(needed):
                column = entry.columns.get(key)
                if column and column not in fr.columns:
                    column_problems.append(
                        f"{file}: column {column!r} ({key}) is named by dataset {entry.name!r} but absent from the file "
                        f"(its columns: {', '.join(fr.columns) or 'none'}); fix `columns` in dataset_info.json"
                    )
            labelled += [(str(file), fr.label(i), row) for i, row in enumerate(fr.rows)]
        labelled = _select(labelled, entry, data_args.max_samples, seed)
        convert = CONVERTERS[(entry.formatting, stage)]
        for file, label, row in labelled:
            try:
                rows.append(convert(row, entry))
            except RowProblem as exc:
                errors.append(RowError(file, label, str(exc)))
    if column_problems:
        raise KllamaError("\n".join(column_problems))
    if errors and not data_args.skip_invalid_rows:
        listed = "\n".join(f"  {e}" for e in errors[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        raise KllamaError(f"{len(errors)} invalid row(s):\n{listed}{more}\n"
                          "fix them, or set skip_invalid_rows: true to drop and count them")
    return rows, len(errors)


def _select(labelled: list, entry: DatasetEntry, max_samples: int | None, seed: int) -> list:
    """`num_samples` (entry) draws a seeded sample (repeating rows when it exceeds the file); `max_samples` keeps
    the first rows, as LLaMA-Factory does."""
    if entry.num_samples is not None:
        rng = random.Random(seed)
        whole, rest = divmod(entry.num_samples, len(labelled)) if labelled else (0, 0)
        labelled = labelled * whole + rng.sample(labelled, rest)
    if max_samples is not None:
        labelled = labelled[:max_samples]
    return labelled
