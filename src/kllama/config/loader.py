"""Load a flat LLaMA-Factory-style YAML/JSON file plus `key=value` overrides into a typed KllamaConfig.

All problems (unknown keys, wrong types, unsupported keys, cross-field conflicts) are collected and reported in one
KllamaError, so a user fixes a config in one round trip.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kllama.config.checks import cross_field_problems
from kllama.config.parsing import CoercionError, coerce, parse_override, type_name
from kllama.config.sections import (
    SECTIONS,
    DataArguments,
    EngineArguments,
    ExportArguments,
    FinetuningArguments,
    GenerationArguments,
    ModelArguments,
    TrainingArguments,
)
from kllama.config.unsupported import ALIASES, UNSUPPORTED
from kllama.errors import KllamaError


@dataclass
class KllamaConfig:
    """The resolved configuration of one command, grouped by concern."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    finetuning: FinetuningArguments = field(default_factory=FinetuningArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    engine: EngineArguments = field(default_factory=EngineArguments)
    generation: GenerationArguments = field(default_factory=GenerationArguments)
    export: ExportArguments = field(default_factory=ExportArguments)
    source: str | None = None  # the config file, if any
    given: frozenset[str] = frozenset()  # keys the user set (file or overrides)

    def sections(self) -> dict[str, Any]:
        """Section name -> section dataclass instance."""
        return {name: getattr(self, name) for name in SECTIONS}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict: section -> {key: value}."""
        return {name: dataclasses.asdict(section) for name, section in self.sections().items()}

    def flat(self) -> dict[str, Any]:
        """Flat LLaMA-Factory-style dict of every key (what a resolved YAML would contain)."""
        out: dict[str, Any] = {}
        for section in self.to_dict().values():
            out.update(section)
        return out


def _field_index() -> dict[str, tuple[str, Any]]:
    """Flat key -> (section name, field type)."""
    index: dict[str, tuple[str, Any]] = {}
    for section_name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            index[f.name] = (section_name, hints[f.name])
    return index


FIELD_INDEX = _field_index()


def field_metadata(key: str) -> dict[str, Any]:
    """The metadata (help, choices) of a flat key."""
    section_name, _ = FIELD_INDEX[key]
    for f in dataclasses.fields(SECTIONS[section_name]):
        if f.name == key:
            return dict(f.metadata)
    raise KeyError(key)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a flat dict; errors name the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise KllamaError(f"config file {str(path)!r} does not exist; pass the path of a YAML or JSON file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KllamaError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise KllamaError(f"config file {str(path)!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KllamaError(f"config file {str(path)!r} must hold a mapping of key: value pairs, not a {type(data).__name__}")
    return data


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELD_INDEX) + list(ALIASES), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_config(raw: dict[str, Any], *, command: str = "train", source: str | None = None,
                 check_paths: bool = True) -> KllamaConfig:
    """Type, validate and group a flat dict of settings; raise one KllamaError listing every problem."""
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    given: set[str] = set()
    for key, value in raw.items():
        key = str(key)
        if key in ALIASES:
            target, convert = ALIASES[key]
            key, value = target, convert(value)
        if key in UNSUPPORTED:
            problems.append(f"{key}: not supported yet by kllama ({UNSUPPORTED[key]}); remove it from the config")
            continue
        if key not in FIELD_INDEX:
            problems.append(f"{key}: unknown key{_suggest(key)}")
            continue
        section_name, tp = FIELD_INDEX[key]
        try:
            typed = coerce(value, tp)
        except CoercionError:
            problems.append(f"{key}: expected {type_name(tp)}, got {value!r}")
            continue
        choices = field_metadata(key).get("choices")
        if choices is not None and typed is not None and typed not in choices:
            problems.append(f"{key}: {typed!r} is not one of {', '.join(choices)}")
            continue
        values[section_name][key] = typed
        given.add(key)
    sections = {name: SECTIONS[name](**vals) for name, vals in values.items()}
    config = KllamaConfig(**sections, source=source, given=frozenset(given))
    if not problems:
        problems.extend(cross_field_problems(config, command=command, check_paths=check_paths))
    if problems:
        where = f" in {source}" if source else ""
        listing = "\n".join(f"  - {p}" for p in problems)
        raise KllamaError(f"{len(problems)} problem(s) with the configuration{where}:\n{listing}")
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, command: str = "train",
                check_paths: bool = True) -> KllamaConfig:
    """Load `path` (YAML/JSON, optional) and apply `key=value` overrides, then validate for `command`."""
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    for text in overrides or []:
        try:
            key, value = parse_override(text)
        except CoercionError as exc:
            raise KllamaError(str(exc)) from None
        raw[key] = value
    return build_config(raw, command=command, source=str(path) if path is not None else None, check_paths=check_paths)


def format_config(config: KllamaConfig) -> str:
    """The fully resolved config as flat YAML grouped by section (defaults shown, user-set keys marked)."""
    lines: list[str] = []
    for name, section in config.to_dict().items():
        lines.append(f"### {name}")
        for key, value in section.items():
            dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()[1:-1]
            mark = "" if key in config.given else "  # default"
            lines.append(f"{dumped}{mark}")
        lines.append("")
    return "\n".join(lines)


__all__ = ["KllamaConfig", "load_config", "build_config", "format_config", "read_config_file", "FIELD_INDEX"]
