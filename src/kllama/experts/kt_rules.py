"""Read KTransformers `kt_optimize_rule` files and translate their routed-experts entries into placements.

A KTransformers rule file is a YAML list of entries `{match: {name: <regex>, class: <dotted class>}, replace:
{class: <dotted class>, kwargs: {...}}, recursive: bool}`; for each module the first entry that matches decides.
kllama keeps every module stock except the routed experts, so only the experts entries change anything:

* `generate_device` (decode) is the short-input target: `cpu` -> cpu, `cuda[:n]` -> gpu (resident).
* `prefill_device` is the long-input target: `cpu` -> cpu, `cuda[:n]` -> stream, or gpu when decode is on cuda too.
  An entry with both on `cpu` (KTransformers' CPU training kernels) is read as "experts in host RAM": no-grad
  passes stay on the CPU, training passes run where kllama measures them fastest (see `KtRuleReport.resolve`).
* `generate_op` / `prefill_op` / `backend` pick KTransformers kernels; kllama checks them against the device, then
  computes in bf16 with torch (quantised backends such as AMXInt8 run as bf16) and says so in `notes`.

Entries for attention, linears, RoPE, MoE blocks, embeddings, the model class and `class: default` are accepted and
reported as handled by stock modules. Anything kllama cannot honour is one KllamaError naming each entry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from kllama.errors import KllamaError
from kllama.experts.crossover import NEVER
from kllama.experts.placement import ExpertPlacement
from kllama.experts.rules import read_yaml

# Replacement classes that install KTransformers' routed-experts operator (last dotted component).
_EXPERTS_CLASSES = frozenset(
    {"KTransformersExperts", "KTransformersExpertsV2", "KExpertsCPU", "KExpertsTorch", "KExpertsMarlin",
     "KSFTExpertsCPU"}
)
# Experts kernels and the device kinds each one can run on; kllama maps all of them to its bf16 torch paths.
_EXPERT_OPS: dict[str, tuple[str, ...]] = {
    "KExpertsCPU": ("cpu",),
    "KSFTExpertsCPU": ("cpu",),
    "KExpertsTorch": ("cpu", "cuda"),
    "KExpertsMarlin": ("cuda",),
}
# CPU expert backends: what KTransformers would do, and what kllama does instead.
_BACKENDS: dict[str, str] = {
    "llamafile": "llamafile (GGML-quantised) kernel runs as bf16 torch",
    "AMXBF16": "AMX bf16 kernel runs as bf16 torch (oneDNN uses AMX where the CPU has it)",
    "AMXInt8": "AMX int8 quantised kernel runs as bf16 torch (no int8 quantisation is applied)",
    "AMXInt4": "AMX int4 quantised kernel runs as bf16 torch (no int4 quantisation is applied; expert_dtype: int4 "
               "holds the experts in int4)",
}
# What the stock transformers module covers for the non-expert replacements (matched on the class name).
# What the stock transformers module covers for the non-expert replacements, by (lower-case) class-name suffix.
_STOCK_KINDS: tuple[tuple[str, str], ...] = (
    ("attention", "attention"),
    ("linear", "linear layers"),
    ("rotaryembedding", "rotary embedding"),
    ("rope", "rotary embedding"),
    ("model", "model class / layer-wise prefill"),
    ("moeblock", "MoE block (router + shared experts)"),
    ("moe", "MoE block (router + shared experts)"),
    ("mlp", "dense MLP"),
    ("embedding", "embeddings"),
    ("norm", "normalisation"),
)
_ENTRY_KEYS = ("match", "replace", "recursive")
_EXPERTS_KWARGS = ("generate_device", "prefill_device", "generate_op", "prefill_op", "backend", "out_device")
# KTransformers files name Mixtral's experts by the pre-5.x path; transformers 5 calls the block `mlp`.
_LEGACY_PATHS: tuple[tuple[str, str], ...] = ((".mlp.experts", ".block_sparse_moe.experts"),)
_CUDA = re.compile(r"^cuda(:(\d+))?$")


@dataclass(frozen=True)
class KtEntry:
    """One validated KTransformers rule entry, reduced to what kllama needs."""

    index: int
    name: re.Pattern[str] | None
    match_class: str | None
    replace_class: str
    kind: str  # experts | default | stock
    short: str | None = None  # experts/default entries: the translated placement targets
    long: str | None = None

    @property
    def label(self) -> str:
        """`entry i /regex/ (Class)` for notes, errors and the placement table."""
        what = f"/{self.name.pattern}/" if self.name is not None else f"class {self.match_class}"
        return f"entry {self.index} {what} ({self.replace_class.rsplit('.', 1)[-1]})"

    def applies_to_experts(self, candidates: list[str]) -> bool:
        """Whether this entry decides a routed-experts module known by `candidates` (its path and legacy aliases).

        Non-expert replacements never do. A `class` check is informational for experts entries (KTransformers'
        class names differ from transformers 5's); a `default` entry only counts when its class looks like experts.
        """
        if self.kind == "stock":
            return False
        if self.name is None:
            return self.kind == "experts" and _looks_like_experts(self.match_class)
        if not any(self.name.search(c) for c in candidates):
            return False
        return self.kind == "experts" or self.match_class is None or _looks_like_experts(self.match_class)


def _looks_like_experts(cls: str | None) -> bool:
    short = (cls or "").rsplit(".", 1)[-1]
    return "Experts" in short and "Shared" not in short


@dataclass
class KtRuleReport:
    """A translated KTransformers rule file: experts entries in order plus one note per handled/ignored entry."""

    path: Path
    entries: list[KtEntry]
    notes: list[str] = field(default_factory=list)
    format: str = "ktransformers"

    def resolve(
        self,
        expert_module_names: list[str],
        *,
        cpu_threads: int | None,
        chunk_size: int,
        default_mode: str = "auto",
        cpu_training: bool = False,
    ) -> dict[str, ExpertPlacement]:
        """Placement of each routed-experts module (qualified name, e.g. `model.layers.7.mlp.experts`).

        The first experts entry whose `name` regex `re.search`es the path (or its pre-5.x alias such as
        `...block_sparse_moe.experts`) decides; unmatched modules get `default_mode`. The crossover is left to be
        measured (KTransformers has no such knob). Raises KllamaError when no entry matches any module, which
        means the file was written for another model.

        An experts entry with both devices `cpu` (KTransformers' CPU training kernels, e.g. KSFTExpertsCPU) says
        where the experts live, host RAM, not where kllama's bf16 passes are fastest: no-grad passes stay on the
        CPU as the rule says, training passes get a measured crossover to streaming (`asked_long` records the
        rule's wish for the start-up line), unless `cpu_training` (the user's `expert_placement: cpu`) keeps them
        on the CPU. Without a CUDA device everything runs on the CPU anyway.
        """
        out: dict[str, ExpertPlacement] = {}
        unmatched: list[str] = []
        for name in expert_module_names:
            candidates = [name] + [name.replace(new, old) for new, old in _LEGACY_PATHS if new in name]
            entry = next((e for e in self.entries if e.applies_to_experts(candidates)), None)
            if entry is None:
                unmatched.append(name)
                out[name] = ExpertPlacement.from_mode(
                    default_mode, cpu_threads=cpu_threads, chunk_size=chunk_size, source="default (no KT rule)"
                )
                continue
            source = f"{self.path.name}#{entry.index} /{entry.name.pattern if entry.name else entry.match_class}/"
            placement = ExpertPlacement(
                short=entry.short,  # type: ignore[arg-type]
                long=entry.long,  # type: ignore[arg-type]
                crossover_tokens=None,
                cpu_threads=cpu_threads,
                chunk_size=chunk_size,
                source=source,
            )
            if entry.short == entry.long == "cpu" and not cpu_training:
                placement = replace(placement, long="stream", infer_crossover_tokens=NEVER, asked_long="cpu",
                                    source=f"{source}; training measured")
            out[name] = placement
        asked = sorted({p.source.split(";")[0] for p in out.values() if p.asked_long == "cpu"})
        for source in asked:
            note = (f"{source}: prefill_device cpu means the experts live in host RAM; kllama runs no-grad passes "
                    f"on the CPU as asked and training passes where it measures them fastest (expert_placement: "
                    f"cpu keeps training on the CPU)")
            if note not in self.notes:
                self.notes.append(note)
        if expert_module_names and len(unmatched) == len(expert_module_names):
            raise KllamaError(
                f"KTransformers rule file {str(self.path)!r} has no experts entry matching this model's routed "
                f"experts (e.g. {expert_module_names[0]!r}); use the rule file written for this model family, or "
                f"add an entry {{match: {{name: '^model\\\\.layers\\\\..*\\\\.mlp\\\\.experts$'}}, replace: "
                f"{{class: ktransformers.operators.experts.KTransformersExperts, kwargs: {{generate_device: cpu, "
                f"prefill_device: cuda}}}}}}"
            )
        return out


def _device_kind(value: object, key: str, where: str, problems: list[str], notes: list[str]) -> str | None:
    """`cpu` or `cuda` for a KTransformers device string; anything else is a problem."""
    if value == "cpu":
        return "cpu"
    m = _CUDA.match(value) if isinstance(value, str) else None
    if m is None:
        problems.append(f"{where}: {key} {value!r} cannot be placed by kllama; use 'cpu' or 'cuda'")
        return None
    if m.group(2) not in (None, "0"):
        notes.append(f"{where}: {key} {value} -> kllama runs on one GPU, the run's compute device")
    return "cuda"


def _translate_experts(kwargs: dict, where: str, problems: list[str], notes: list[str], *, default_device: str
                       ) -> tuple[str, str] | None:
    """Check an experts entry's kwargs and map its devices to (short, long) targets."""
    start = len(problems)
    gen = _device_kind(kwargs.get("generate_device", default_device), "generate_device", where, problems, notes)
    pre = _device_kind(kwargs.get("prefill_device", default_device), "prefill_device", where, problems, notes)
    for op_key, device in (("generate_op", gen), ("prefill_op", pre)):
        op = kwargs.get(op_key)
        if op is None:
            continue
        if op not in _EXPERT_OPS:
            problems.append(f"{where}: {op_key} {op!r} is not an experts kernel kllama can map; use one of "
                            f"{', '.join(_EXPERT_OPS)} or remove it")
        elif device is not None and device not in _EXPERT_OPS[op]:
            problems.append(f"{where}: {op_key} {op} cannot run on {device}; use "
                            f"{' or '.join(_EXPERT_OPS[op])} for that device or another op")
    backend = kwargs.get("backend")
    if backend is not None:
        notes.append(f"{where}: backend {backend}: "
                     + _BACKENDS.get(str(backend), "unknown backend, ignored; experts run as bf16 torch"))
    ignored = sorted(set(kwargs) - set(_EXPERTS_KWARGS))
    if ignored:
        notes.append(f"{where}: kwargs {', '.join(ignored)} ignored (no kllama equivalent)")
    if len(problems) > start or gen is None or pre is None:
        return None
    short = "cpu" if gen == "cpu" else "gpu"
    long = "cpu" if pre == "cpu" else ("gpu" if gen == "cuda" else "stream")
    return short, long


def _parse_entry(raw: object, index: int, problems: list[str], notes: list[str]) -> KtEntry | None:
    """Validate one KTransformers entry, appending every problem; return it when usable."""
    where = f"entry {index}"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping with 'match' and 'replace', got {raw!r}")
        return None
    if isinstance(raw.get("match"), dict):
        m = raw["match"]
        where = f"entry {index} " + (f"/{m['name']}/" if "name" in m else f"class {m.get('class')}")
    start = len(problems)
    for key in raw:
        if key not in _ENTRY_KEYS:
            problems.append(f"{where}: unknown key {key!r}; entries have {', '.join(_ENTRY_KEYS)}")
    match, replace = raw.get("match"), raw.get("replace")
    pattern: re.Pattern[str] | None = None
    match_class: str | None = None
    if not isinstance(match, dict) or not ({"name", "class"} & set(match)):
        problems.append(f"{where}: 'match' must be a mapping with 'name' (regex) and/or 'class', got {match!r}")
    else:
        for key in set(match) - {"name", "class"}:
            problems.append(f"{where}: unknown match key {key!r}; use 'name' and/or 'class'")
        if "name" in match:
            try:
                pattern = re.compile(str(match["name"]))
            except re.error as exc:
                problems.append(f"{where}: match.name {match['name']!r} is not a valid regex ({exc})")
        match_class = str(match["class"]) if match.get("class") is not None else None
    if not isinstance(replace, dict) or not isinstance(replace.get("class"), str):
        problems.append(f"{where}: 'replace' must be a mapping with a 'class' string, got {replace!r}")
        return None
    kwargs = replace.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        problems.append(f"{where}: replace.kwargs must be a mapping, got {kwargs!r}")
        return None
    if "recursive" in raw and not isinstance(raw["recursive"], bool):
        problems.append(f"{where}: recursive must be true or false, got {raw['recursive']!r}")
    if len(problems) > start:
        return None
    cls = replace["class"]
    short_cls = cls.rsplit(".", 1)[-1]
    entry = KtEntry(index, pattern, match_class, cls, "stock")
    label = entry.label
    if short_cls in _EXPERTS_CLASSES:
        targets = _translate_experts(kwargs, where, problems, notes, default_device="cpu")
        if targets is None:
            return None
        notes.append(f"{label}: routed experts -> short={targets[0]} long={targets[1]}")
        if match_class is not None and pattern is not None:
            notes.append(f"{label}: match.class {match_class} is informational (transformers 5 names the experts "
                         f"class differently); the name regex decides")
        return KtEntry(index, pattern, match_class, cls, "experts", *targets)
    if cls == "default":
        # A stock module kept on its device; it only matters if it happens to match an experts module first.
        targets = _translate_experts(kwargs, where, problems, notes, default_device="cuda")
        notes.append(f"{label}: handled by stock modules (class default)")
        if targets is None:
            return None
        return KtEntry(index, pattern, match_class, cls, "default", *targets)
    low = short_cls.lower()
    kind = next((what for key, what in _STOCK_KINDS if low.endswith(key)), None) or next(
        (what for key, what in _STOCK_KINDS if key in low), None)
    notes.append(f"{label}: handled by stock modules ({kind})" if kind else
                 f"{label}: unknown to kllama, the stock transformers module runs instead")
    return entry


def parse_kt_rules(data: object, path: Path) -> KtRuleReport:
    """Validate parsed YAML as a KTransformers rule file and translate it; one KllamaError lists every problem."""
    problems: list[str] = []
    notes: list[str] = []
    if not isinstance(data, list) or not data:
        raise KllamaError(f"KTransformers rule file {str(path)!r} must be a non-empty YAML list of "
                          f"{{match: ..., replace: ...}} entries")
    entries = [e for i, raw in enumerate(data) if (e := _parse_entry(raw, i, problems, notes)) is not None]
    if problems:
        raise KllamaError(f"KTransformers rule file {str(path)!r} has {len(problems)} problem(s) kllama cannot "
                          f"honour:\n  - " + "\n  - ".join(problems))
    if not any(e.kind == "experts" for e in entries):
        notes.append("no routed-experts entry: this file places no experts (resolve() will say so)")
    return KtRuleReport(path=path, entries=entries, notes=notes)


def load_kt_rules(path: str | Path) -> KtRuleReport:
    """Load a KTransformers `kt_optimize_rule` YAML file and translate its experts entries (see module docstring)."""
    p = Path(path)
    return parse_kt_rules(read_yaml(p, "KTransformers rule file"), p)
