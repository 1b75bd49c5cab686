"""On-disk cache of tokenized datasets, keyed by everything that changes the token ids.

The key hashes the data files' bytes, the dataset entries, the tokenizer (vocabulary, special tokens, chat
template), the template, `cutoff_len`, the stage and the row-selection options. A hit loads the tokenized rows and
their summary with `datasets.load_from_disk` and skips reading and tokenizing altogether.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

CACHE_VERSION = 1  # bump when tokenization changes without any input changing


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full state (vocab/merges, special tokens, chat template)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def cache_key(*, entries, files: list[Path], tokenizer, template, options: dict) -> str:
    """The cache key (hex) of one build: change any input and the key changes."""
    payload = {
        "version": CACHE_VERSION,
        "entries": [{k: str(v) if isinstance(v, Path) else v for k, v in asdict(e).items() if k != "explicit_columns"}
                    for e in entries],
        "files": [[str(f), file_digest(f)] for f in files],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template.fingerprint(),
        "options": options,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "tokenized" / key


def load_cached(cache_dir: str | Path, key: str):
    """(datasets.DatasetDict, summary dict) for `key`, or None when absent or unreadable."""
    import datasets

    path = cache_path(cache_dir, key)
    try:
        data = datasets.load_from_disk(str(path / "data"))
        summary = json.loads((path / "summary.json").read_text())
    except Exception:  # a half-written or foreign directory is a miss, never an error
        return None
    return data, summary


def save_cached(cache_dir: str | Path, key: str, data, summary: dict) -> None:
    """Write atomically-enough: into a temp dir, then rename, so readers never see half a cache."""
    path = cache_path(cache_dir, key)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    data.save_to_disk(str(tmp / "data"))
    (tmp / "summary.json").write_text(json.dumps(summary))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
