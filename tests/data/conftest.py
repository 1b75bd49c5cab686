"""Fixtures for the data tests (helpers live in data_helpers.py)."""
from __future__ import annotations

import pytest
from data_helpers import FAMILY, make_tokenizer


@pytest.fixture
def family_tokenizer():
    """`family_tokenizer("llama3")` -> a tokenizer with that family's bos/eos."""
    def make(name: str, **kw) -> PreTrainedTokenizerFast:
        bos, eos = FAMILY[name]
        return make_tokenizer(bos, eos, **kw)
    return make

