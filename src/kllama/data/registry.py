"""The dataset registry: names in `<dataset_dir>/dataset_info.json` resolved to files and column layouts.

Entries follow LLaMA-Factory's `dataset_info.json` keys (`file_name`, `formatting`, `ranking`, `columns`, `tags`,
`split`, `num_samples`, `hf_hub_url`, ...). kllama adds two `formatting` values: `openai` (a `messages` column of
role/content dicts) and `trl` (`prompt`/`chosen`/`rejected` columns holding strings or message lists).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kllama.data.readers import read_utf8_text
from kllama.errors import KllamaError

FORMATTINGS = ("alpaca", "sharegpt", "openai", "trl")

# Default column names per formatting (LLaMA-Factory's, plus kllama's openai/trl).
DEFAULT_COLUMNS: dict[str, dict[str, str | None]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None,
               "chosen": "chosen", "rejected": "rejected"},
    "sharegpt": {"messages": "conversations", "system": None, "tools": None, "chosen": "chosen", "rejected": "rejected"},
    "openai": {"messages": "messages", "system": None, "tools": None, "chosen": "chosen", "rejected": "rejected"},
    "trl": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "messages": "messages", "system": None},
}
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"},
}
DEFAULT_TAGS["trl"] = DEFAULT_TAGS["openai"]
DEFAULT_TAGS["alpaca"] = DEFAULT_TAGS["sharegpt"]
_COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected"}
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset: where its rows are and how to read them."""

    name: str
    path: Path  # a file, or a folder whose files are all read
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    num_samples: int | None = None
    explicit_columns: frozenset[str] = frozenset()  # column keys the entry names itself: they must exist


def bundled_data_dir() -> Path:
    """The directory of kllama's bundled data (its own `dataset_info.json`, `dpo_en_demo`, `alpaca_en_demo`)."""
    return Path(str(resources.files("kllama.resources").joinpath("data")))


def read_dataset_info(dataset_dir: str | Path | None) -> tuple[Path, dict]:
    """(resolved dataset_dir, parsed dataset_info.json); KllamaError when it is missing or not valid JSON."""
    root = Path(dataset_dir) if dataset_dir else bundled_data_dir()
    info_path = root / "dataset_info.json"
    if not info_path.is_file():
        raise KllamaError(
            f"dataset_dir {str(root)!r} has no dataset_info.json; point dataset_dir at a directory that has one "
            "(or leave it unset to use kllama's bundled data)"
        )
    try:
        info = json.loads(read_utf8_text(info_path))
    except json.JSONDecodeError as exc:
        raise KllamaError(f"{info_path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") from exc
    if not isinstance(info, dict):
        raise KllamaError(f"{info_path} must hold a JSON object mapping dataset names to entries")
    return root, info


def resolve_datasets(names: list[str] | str, dataset_dir: str | Path | None) -> list[DatasetEntry]:
    """Look each name up in `<dataset_dir>/dataset_info.json`; all problems are reported at once."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    root, info = read_dataset_info(dataset_dir)
    entries, problems = [], []
    for name in names:
        if name not in info:
            problems.append(f"dataset {name!r} is not registered in {root / 'dataset_info.json'} "
                            f"(registered: {', '.join(sorted(info)) or 'none'})")
            continue
        try:
            entries.append(_parse_entry(name, info[name], root))
        except KllamaError as exc:
            problems.append(str(exc))
    if problems:
        raise KllamaError("\n".join(problems))
    return entries


def _parse_entry(name: str, raw: dict, root: Path) -> DatasetEntry:
    where = f"dataset {name!r} in {root / 'dataset_info.json'}"
    if not isinstance(raw, dict):
        raise KllamaError(f"{where}: the entry must be a JSON object")
    if "file_name" not in raw:
        hub = next((k for k in _HUB_KEYS if k in raw), None)
        if hub is not None:
            raise KllamaError(
                f"{where} is fetched from a hub ({hub}: {raw[hub]!r}) and kllama reads local files only: download it "
                f"first (e.g. `huggingface-cli download --repo-type dataset {raw[hub]} --local-dir <dir>`), then set "
                f"its entry's file_name to the downloaded file or folder"
            )
        raise KllamaError(f"{where} has no file_name; set it to a file or folder inside {root}")
    formatting = raw.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise KllamaError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    columns = dict(DEFAULT_COLUMNS[formatting])
    user_columns = raw.get("columns") or {}
    unknown = set(user_columns) - _COLUMN_KEYS
    if unknown:
        raise KllamaError(f"{where}: unknown columns keys {sorted(unknown)}; valid: {sorted(_COLUMN_KEYS)}")
    columns.update(user_columns)
    tags = dict(DEFAULT_TAGS[formatting])
    tags.update(raw.get("tags") or {})
    path = Path(raw["file_name"])
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise KllamaError(f"{where}: file_name {raw['file_name']!r} does not exist (looked for {path})")
    num_samples = raw.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise KllamaError(f"{where}: num_samples must be a positive integer, got {num_samples!r}")
    return DatasetEntry(
        name=name, path=path, formatting=formatting, ranking=bool(raw.get("ranking", False)), columns=columns,
        tags=tags, split=raw.get("split", "train"), num_samples=num_samples,
        explicit_columns=frozenset(k for k, v in user_columns.items() if v),
    )
