"""kllama's own expert-placement rule files, and the one entry point that reads either rule format.

A kllama rule file says, per routed-experts module, where its experts run. It is a YAML list of entries, or a
mapping with `rules:` (that list) and an optional `default:` (a placement name or an entry without `match`):

```yaml
default: auto
rules:
  - match: "layers\\.(1|2|3)\\.mlp\\.experts$"   # re.search on the module path
    placement: gpu                             # cpu | stream | gpu | auto
  - match: "mlp\\.experts$"
    placement: auto
    crossover_tokens: 512                      # only for auto; omitted = measured at start-up
    cpu_threads: 32
    chunk_size: 8192
```

The first entry whose `match` finds the module path decides; modules no entry matches get `default:` (or the
caller's `default_mode`). Validation reports every problem in the file at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from kllama.errors import KllamaError
from kllama.experts.placement import MODES, ExpertPlacement

_ENTRY_KEYS = ("match", "placement", "crossover_tokens", "cpu_threads", "chunk_size")
_TOP_KEYS = ("default", "rules")


class RuleReport(Protocol):
    """What every loaded rule file offers, whichever format it came from."""

    path: Path
    format: str
    notes: list[str]

    def resolve(
        self,
        expert_module_names: list[str],
        *,
        cpu_threads: int | None,
        chunk_size: int,
        default_mode: str = "auto",
        cpu_training: bool = False,
    ) -> dict[str, ExpertPlacement]: ...


@dataclass(frozen=True)
class PlacementRule:
    """One validated entry: a compiled module-path regex and what it sets. `match=None` is the file's default."""

    index: int  # position in the file's rule list (-1 for `default:`)
    match: re.Pattern[str] | None
    placement: str
    crossover_tokens: int | None = None
    cpu_threads: int | None = None
    chunk_size: int | None = None

    def source(self, path: Path) -> str:
        """How the placement table names this rule."""
        if self.match is None:
            return f"{path.name}:default"
        return f"{path.name}#{self.index} /{self.match.pattern}/"

    def to_placement(self, path: Path, *, cpu_threads: int | None, chunk_size: int) -> ExpertPlacement:
        """The placement this rule gives; its own cpu_threads/chunk_size win over the run-wide ones."""
        return ExpertPlacement.from_mode(
            self.placement,
            crossover_tokens=self.crossover_tokens,
            cpu_threads=self.cpu_threads if self.cpu_threads is not None else cpu_threads,
            chunk_size=self.chunk_size if self.chunk_size is not None else chunk_size,
            source=self.source(path),
        )


@dataclass
class RuleSet:
    """A loaded kllama rule file: ordered rules (first match wins) and an optional default."""

    path: Path
    rules: list[PlacementRule]
    default: PlacementRule | None = None
    notes: list[str] = field(default_factory=list)
    format: str = "kllama"

    def resolve(
        self,
        expert_module_names: list[str],
        *,
        cpu_threads: int | None,
        chunk_size: int,
        default_mode: str = "auto",
        cpu_training: bool = False,
    ) -> dict[str, ExpertPlacement]:
        """Placement of each routed-experts module (by qualified name, e.g. `model.layers.7.mlp.experts`).

        The first rule whose regex `re.search`es the name decides; unmatched names get the file's `default:` or,
        without one, `default_mode` (source `default`). `cpu_threads` / `chunk_size` are the run-wide values
        (`cpu_infer` / `chunk_size` of the training YAML) used where a rule does not set its own. kllama's own
        `placement: cpu` already means the CPU for every pass, so `cpu_training` changes nothing here.
        """
        out: dict[str, ExpertPlacement] = {}
        for name in expert_module_names:
            rule = next((r for r in self.rules if r.match is not None and r.match.search(name)), self.default)
            if rule is None:
                out[name] = ExpertPlacement.from_mode(
                    default_mode, cpu_threads=cpu_threads, chunk_size=chunk_size, source="default"
                )
            else:
                out[name] = rule.to_placement(self.path, cpu_threads=cpu_threads, chunk_size=chunk_size)
        return out


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse a YAML file, turning a missing file or a syntax error into a KllamaError that names it."""
    p = Path(path)
    if not p.is_file():
        raise KllamaError(f"{what} {str(p)!r} does not exist; check the path (relative paths start at the "
                          f"directory you run kllama from)")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        hint = "write regexes in single quotes, or double every backslash inside double quotes"
        raise KllamaError(f"{what} {str(p)!r} is not valid YAML: {exc}; fix the syntax at the place shown "
                          f"({hint})") from exc


def _check_int(value: object, key: str, minimum: int, where: str, problems: list[str]) -> int | None:
    # bool is an int subclass; `cpu_threads: true` is a typo, not 1 thread.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
        return None
    return value


def _parse_entry(
    raw: object, index: int, where: str, problems: list[str], *, needs_match: bool
) -> PlacementRule | None:
    """Validate one entry, appending every problem found; return the rule when it is usable."""
    if isinstance(raw, str) and not needs_match:
        raw = {"placement": raw}  # `default: auto` shorthand
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping like {{match: 'mlp\\.experts$', placement: auto}}, "
                        f"got {type(raw).__name__} {raw!r}")
        return None
    start = len(problems)
    allowed = _ENTRY_KEYS if needs_match else _ENTRY_KEYS[1:]
    for key in raw:
        if key not in allowed:
            problems.append(f"{where}: unknown key {key!r}; allowed keys are {', '.join(allowed)}")
    pattern: re.Pattern[str] | None = None
    if needs_match:
        match = raw.get("match")
        if not isinstance(match, str) or not match:
            problems.append(f"{where}: 'match' must be a non-empty regex string on the module path, got {match!r}")
        else:
            try:
                pattern = re.compile(match)
            except re.error as exc:
                problems.append(f"{where}: match {match!r} is not a valid regex ({exc}); escape dots as '\\\\.'")
    placement = raw.get("placement")
    if placement not in MODES:
        problems.append(f"{where}: placement must be one of {', '.join(MODES)}, got {placement!r}")
    crossover = _check_int(raw.get("crossover_tokens"), "crossover_tokens", 1, where, problems)
    if crossover is not None and placement in MODES and placement != "auto":
        problems.append(f"{where}: crossover_tokens only applies to placement auto (this entry is {placement}); "
                        f"remove it or set placement: auto")
    threads = _check_int(raw.get("cpu_threads"), "cpu_threads", 1, where, problems)
    chunk = _check_int(raw.get("chunk_size"), "chunk_size", 1, where, problems)
    if len(problems) > start:
        return None
    return PlacementRule(index, pattern, str(placement), crossover, threads, chunk)


def parse_rules(data: object, path: Path) -> RuleSet:
    """Validate parsed YAML as a kllama rule file; one KllamaError lists every problem (file, entry, fix)."""
    problems: list[str] = []
    default: PlacementRule | None = None
    entries: object = data
    if isinstance(data, dict):
        for key in data:
            if key not in _TOP_KEYS:
                problems.append(f"top level: unknown key {key!r}; allowed keys are {', '.join(_TOP_KEYS)}")
        if "default" in data:
            default = _parse_entry(data["default"], -1, "default", problems, needs_match=False)
        entries = data.get("rules", [])
    if not isinstance(entries, list):
        problems.append(f"rules must be a YAML list of entries, got {type(entries).__name__}")
        entries = []
    rules = []
    for i, raw in enumerate(entries):
        rule = _parse_entry(raw, i, f"entry {i}", problems, needs_match=True)
        if rule is not None:
            rules.append(rule)
    if not rules and default is None and not problems:
        problems.append("the file has no rules; add entries like {match: 'mlp\\.experts$', placement: auto}")
    if problems:
        raise KllamaError(f"expert rule file {str(path)!r} has {len(problems)} problem(s):\n  - "
                          + "\n  - ".join(problems))
    return RuleSet(path=path, rules=rules, default=default)


def load_rules(path: str | Path) -> RuleSet:
    """Load and validate a kllama-format expert rule file (see the module docstring for the format)."""
    p = Path(path)
    return parse_rules(read_yaml(p, "expert rule file"), p)


def is_kt_format(data: object) -> bool:
    """True when parsed YAML looks like a KTransformers optimize rule (entries with `match: {...}` + `replace`)."""
    if not isinstance(data, list) or not data:
        return False
    return any(isinstance(e, dict) and (isinstance(e.get("match"), dict) or "replace" in e) for e in data)


def load_rule_file(path: str | Path) -> RuleReport:
    """Load a rule file in either format, detected from its content (KTransformers' `kt_optimize_rule` entries
    have a `match:` mapping and a `replace:`; kllama's have a `match:` regex and a `placement:`)."""
    from kllama.experts.kt_rules import parse_kt_rules  # kt_rules builds on this module

    p = Path(path)
    data = read_yaml(p, "expert rule file")
    parser: Callable[[object, Path], RuleReport] = parse_kt_rules if is_kt_format(data) else parse_rules
    return parser(data, p)
