"""Reading a registered dataset's files into plain rows, with every problem tied to a file and a row.

Files are loaded with `datasets` (JSON/JSONL, CSV, Parquet). When `datasets` cannot parse a JSON file we re-read it
with the standard library to say which line is broken (and, for JSON Lines with `skip_invalid_rows`, skip it).
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kllama.errors import KllamaError

# File suffix -> the `datasets` builder that reads it.
BUILDERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class RowError:
    """A problem with one row (index counted from 0 within its file; for JSON Lines parse errors, the line)."""

    file: str
    where: str  # "row 3" or "line 4"
    problem: str

    def __str__(self) -> str:
        return f"{self.file}, {self.where}: {self.problem}"


@dataclass
class FileRows:
    """The rows of one file, the columns it has, and the rows that could not even be parsed."""

    file: Path
    rows: list[dict]
    columns: list[str]
    errors: list[RowError]
    labels: list[str] | None = None  # how each row is named in messages (default "row <i>")

    def label(self, i: int) -> str:
        return self.labels[i] if self.labels is not None else f"row {i}"


def list_files(path: Path) -> list[Path]:
    """The data files of an entry: the file itself, or every non-hidden file in the folder (one format)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise KllamaError(f"{path} holds no data files; put JSON, JSONL, CSV or Parquet files in it")
    suffixes = {f.suffix.lower() for f in files}
    bad = suffixes - set(BUILDERS)
    if bad:
        raise KllamaError(f"{path}: unsupported file type(s) {sorted(bad)}; use one of {sorted(BUILDERS)}")
    if len({BUILDERS[s] for s in suffixes}) > 1:
        raise KllamaError(f"{path} mixes file types {sorted(suffixes)}; keep one format per dataset folder")
    return files


def read_file(file: Path, split: str = "train") -> FileRows:
    """Load one file's rows with `datasets`; a JSON file it cannot parse is diagnosed line by line instead."""
    import datasets

    builder = BUILDERS[file.suffix.lower()]
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.ERROR)
    # The rows are turned into Python objects right away and the tokenized result is what kllama caches, so
    # datasets' own Arrow cache lives in a throwaway directory (no stale copies of edited files).
    with tempfile.TemporaryDirectory(prefix="kllama-read-") as tmp:
        try:
            ds = datasets.load_dataset(builder, data_files={split: [str(file)]}, split=split, cache_dir=tmp)
            rows, columns = ds.to_list(), list(ds.column_names)
        except Exception as exc:  # datasets wraps parse errors in several types; all mean "could not read the file"
            if builder != "parquet":
                read_utf8_text(file)  # a clear error when the cause is the encoding
            if builder == "json":
                return _read_json_stdlib(file)
            raise KllamaError(f"{file} could not be read as {builder.upper()} ({_first_line(exc)}); fix the file") from exc
    return FileRows(file=file, rows=rows, columns=columns, errors=[])


def read_utf8_text(file: Path) -> str:
    """The text of `file`; a file that is not UTF-8 is one KllamaError naming the line and byte (no row of it can be
    read, so `skip_invalid_rows` cannot help)."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise KllamaError(
            f"{file} is not UTF-8 text: line {line}, byte {exc.start} ({data[exc.start:exc.start + 1]!r}) cannot be "
            "decoded; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.json > out.json`)"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc.__cause__ or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_json_stdlib(file: Path) -> FileRows:
    """A JSON array is all-or-nothing (error at its line); JSON Lines gets one RowError per broken line."""
    text = read_utf8_text(file)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KllamaError(f"{file} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
        if not all(isinstance(r, dict) for r in data):
            i = next(i for i, r in enumerate(data) if not isinstance(r, dict))
            raise KllamaError(f"{file}, row {i}: every row must be a JSON object, got {type(data[i]).__name__}")
        return FileRows(file, data, _union_keys(data), [])
    rows, errors, labels = [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(RowError(str(file), f"line {lineno}", f"broken JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(row, dict):
            errors.append(RowError(str(file), f"line {lineno}", f"a row must be a JSON object, got {type(row).__name__}"))
            continue
        rows.append(row)
        labels.append(f"line {lineno}")
    return FileRows(file, rows, _union_keys(rows), errors, labels)


def _union_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return list(keys)
