"""The suite runs on a bounded number of CPU threads (tests/conftest.py), here and in the subprocesses it starts."""
from __future__ import annotations

import os
import subprocess
import sys

import torch


def test_torch_and_subprocesses_use_the_capped_thread_count() -> None:
    threads = int(os.environ["OMP_NUM_THREADS"])  # set by conftest when the user did not set it
    assert torch.get_num_threads() == threads
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert int(child.stdout.strip()) == threads
