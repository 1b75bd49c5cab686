"""Typed configuration: sections, loading, overrides and validation (imports nothing else of kllama)."""
from kllama.config.loader import KllamaConfig, build_config, format_config, load_config, read_config_file
from kllama.config.sections import (
    DataArguments,
    EngineArguments,
    ExportArguments,
    FinetuningArguments,
    GenerationArguments,
    ModelArguments,
    TrainingArguments,
)
from kllama.config.units import parse_bytes

__all__ = [
    "KllamaConfig", "load_config", "build_config", "format_config", "read_config_file", "parse_bytes",
    "ModelArguments", "DataArguments", "FinetuningArguments", "TrainingArguments", "EngineArguments",
    "GenerationArguments", "ExportArguments",
]
