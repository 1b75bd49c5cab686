"""A model directory as every command reads it: checked, its config parsed, and the decision whether its own code runs.

Hub checkpoints such as DeepSeek-V2-Lite ship Python next to the weights (`auto_map` in config.json naming
`configuration_*.py` / `modeling_*.py`), written for the transformers of their day; on transformers 5 that code no
longer imports. Whenever transformers ships a class for the config's `model_type`, kllama uses it and never runs
the directory's code, whatever `trust_remote_code` says (the expert engine replaces the routed experts of those
native classes only). A directory's own code runs only for a model type transformers lacks, and only with
`trust_remote_code: true`. The policy lives here so train, chat, api and export decide the same way.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kllama.errors import KllamaError

CONFIG_FILE = "config.json"

_announced: set[Path] = set()  # directories whose unused auto_map was already reported in this process


@dataclass(frozen=True)
class ModelSource:
    """A checked model directory, its transformers config, and whether loading it runs the directory's own code."""

    path: Path
    hf_config: PretrainedConfig
    remote_code: bool  # True only for a model type transformers lacks, with trust_remote_code: true

    @property
    def model_type(self) -> str:
        return str(getattr(self.hf_config, "model_type", ""))


def check_model_dir(path: str | Path | None) -> Path:
    """`model_name_or_path` must be a local Hugging Face directory with a config.json (kllama does not download)."""
    if not path:
        raise KllamaError("model_name_or_path: required; set it to a Hugging Face model directory")
    p = Path(path)
    if not p.is_dir():
        hub_id = not p.is_absolute() and str(path).count("/") == 1 and not str(path).startswith(".")
        fetch = (f"download it first (e.g. `huggingface-cli download {path} --local-dir models/{p.name}`) and point "
                 f"model_name_or_path at that directory" if hub_id else "check the path")
        raise KllamaError(f"model_name_or_path: {str(path)!r} is not a directory; {fetch}, or build a tiny model "
                          f"with `kllama tiny DIR`")
    if not (p / CONFIG_FILE).is_file():
        raise KllamaError(f"model_name_or_path: {str(path)!r} has no {CONFIG_FILE}; give a Hugging Face model directory")
    return p


def _raw_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KllamaError(f"{path} is not valid JSON ({exc}); download the model again") from None
    if not isinstance(raw, dict):
        raise KllamaError(f"{path} is not a JSON object; download the model again")
    return raw


def is_native(model_type: str | None) -> bool:
    """True when transformers ships a causal-LM class for `model_type`."""
    return model_type in CONFIG_MAPPING and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _runs_remote_code(model_dir: Path, raw: dict, trust_remote_code: bool) -> bool:
    """The policy of the module docstring; raises for a model type that cannot be loaded as configured."""
    model_type, auto_map = raw.get("model_type"), raw.get("auto_map") or {}
    if is_native(model_type):
        if auto_map and model_dir.resolve() not in _announced:
            _announced.add(model_dir.resolve())
            print(f"kllama: {model_dir}: model_type {model_type!r} uses transformers' own class; the directory's "
                  f"code (auto_map) is not run", file=sys.stderr, flush=True)
        return False
    if not auto_map:
        raise KllamaError(f"{model_dir / CONFIG_FILE}: model_type {model_type!r} is unknown to transformers "
                          f"{transformers.__version__} and the directory ships no code (auto_map); upgrade "
                          f"transformers or give a model of a supported family")
    if not trust_remote_code:
        raise KllamaError(f"{model_dir}: model_type {model_type!r} is not built into transformers "
                          f"{transformers.__version__}; loading it runs the directory's own Python code (auto_map). "
                          f"Set trust_remote_code: true if you trust that code")
    return True


def read_model_source(model_dir: str | Path | None, *, trust_remote_code: bool) -> ModelSource:
    """Check `model_dir`, decide whether its own code runs, and read its config with transformers' class for it."""
    path = check_model_dir(model_dir)
    remote = _runs_remote_code(path, _raw_config(path), trust_remote_code)
    # The directory's own code can fail in any way (a missing class is an AttributeError, a removed transformers
    # module an ImportError, depending on the transformers version); transformers' own classes fail with these.
    failures: tuple[type[BaseException], ...] = (Exception,) if remote else (ValueError, OSError, ImportError)
    try:
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=remote)
    except failures as exc:
        raise KllamaError(f"cannot read the config of {path}: {type(exc).__name__}: {exc}") from None
    return ModelSource(path, hf_config, remote)
