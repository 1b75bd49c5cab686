"""Datasets for preference (DPO family) and SFT training: registry, formats, chat templates, tokenization, batches.

Public API: `get_template`, `build_dataset` (-> `DatasetBundle`), `PairwiseCollator`, `SFTCollator`,
`format_summary`, `describe_example`, `bundled_data_dir`.
"""
from kllama.data.collate import PairwiseCollator, SFTCollator
from kllama.data.loader import DatasetBundle, build_dataset
from kllama.data.registry import bundled_data_dir, resolve_datasets
from kllama.data.summary import DataSummary, describe_example, format_summary
from kllama.data.templates import IGNORE_INDEX, TEMPLATES, Template, get_template, template_names, truncate_lengths

__all__ = [
    "IGNORE_INDEX", "TEMPLATES", "DataSummary", "DatasetBundle", "PairwiseCollator", "SFTCollator", "Template",
    "build_dataset", "bundled_data_dir", "describe_example", "format_summary", "get_template", "resolve_datasets",
    "template_names", "truncate_lengths",
]
