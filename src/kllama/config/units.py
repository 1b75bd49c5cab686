"""Byte sizes written by people: `24GB`, `24GiB`, `512MB`, `24` (= GB)."""
from __future__ import annotations

import re

_UNITS = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """Parse a size such as `24GB` (10^9), `24GiB` (2^30) or a bare number of GB into bytes."""
    if isinstance(text, (int, float)):
        return int(text * 10**9)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 24GB, 24GiB or 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
