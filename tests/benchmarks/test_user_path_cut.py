"""benchmarks/user_path.py when a `timeout` ends it mid-phase: the command is ended, what it logged is kept (the
H200 box's call limit cut two runs after `kllama train` had written its adapter and before the JSON), and a finished
command reports how long it took to exit after its last line."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def user_path(benchmark_script) -> ModuleType:  # noqa: ANN001
    return benchmark_script("user_path")


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_sigterm_ends_the_command_and_keeps_its_log(user_path: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    start = time.perf_counter()
    with user_path.cut_on_sigterm():
        timer.start()
        result = user_path.run_cli(_child("print('step 1', flush=True); import time; time.sleep(60)"), log)
    timer.join()
    assert result["cut"] is True and "cut by SIGTERM" in result["note"]
    assert result["exit_code"] != 0 and time.perf_counter() - start < 15  # the child was ended, not waited for
    assert log.read_text().strip() == "step 1"


def test_outside_the_block_sigterm_keeps_its_previous_handler(user_path: ModuleType) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with user_path.cut_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_finished_command_reports_its_exit_time(user_path: ModuleType, tmp_path: Path) -> None:
    result = user_path.run_cli(_child("print('adapter written', flush=True); import time; time.sleep(1.0)"),
                               tmp_path / "log.txt")
    assert result["exit_code"] == 0 and "cut" not in result
    assert 0.9 <= result["exit_s"] < 10


def test_logged_windows_are_read_from_the_log_when_the_state_file_is_missing(user_path: ModuleType) -> None:
    # lines as `kllama train` printed them on the H200 box (results/user_path_v2lite_seed_packed_h200_s9d_*)
    text = "\n".join([
        "  | micro-batching: 1 x 8 accumulation -> ...",
        "{'loss': '0.693', 'grad_norm': '17.68', 'learning_rate': '3.355e-06', 'tokens_per_second': '8032', "
        "'peak_gpu_memory_gb': '18.69', 'epoch': '0.2632'}",
        "{'loss': '0.6869', 'grad_norm': '19.1', 'tokens_per_second': '8961', 'peak_gpu_memory_gb': '18.82'}",
        "{'train_runtime': '30.33', 'train_loss': '0.6899'}",
        "{'not': python}",
    ])
    history = user_path.logged_history(text)
    assert [h.get("tokens_per_second") for h in history] == [8032.0, 8961.0, None]
    assert history[0]["loss"] == pytest.approx(0.693) and history[2]["train_runtime"] == pytest.approx(30.33)
