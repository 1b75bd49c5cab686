"""kllama: preference-tune and serve Mixture-of-Experts LLMs that do not fit on one GPU."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "preference_loss", "KllamaError"]

from kllama.errors import KllamaError


def __getattr__(name: str) -> Any:
    # Lazy so `import kllama` (and `kllama --help`) does not pay for importing torch.
    if name == "preference_loss":
        from kllama.train.losses import preference_loss

        return preference_loss
    raise AttributeError(f"module 'kllama' has no attribute {name!r}")
