"""The one exception type for problems a user can cause and fix (config, data, paths, API requests)."""
from __future__ import annotations


class KllamaError(Exception):
    """A user-fixable problem. The message names the thing that is wrong and how to fix it.

    The CLI prints it without a traceback and exits with status 2.
    """
