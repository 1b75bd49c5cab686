"""The allocator `kllama train` runs with: expandable segments unless the user chose, said in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kllama.train.allocator import ALLOC_CONF_VARS, TRAIN_ALLOC_CONF, expandable_segments, use_training_allocator
from kllama.train.launch import in_torchrun_worker, worker_env

REPO = Path(__file__).resolve().parents[2]


def test_expandable_segments_are_set_when_the_user_set_no_allocator_variable():
    env: dict[str, str] = {"PATH": "/bin"}
    line = use_training_allocator(env)
    assert env == {"PATH": "/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert line.startswith("GPU allocator: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by kllama train")
    assert expandable_segments(env)
    # torchrun's workers get the launcher's environment, setting included, and find it set: nothing changes there
    command = ["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "kllama", "train"]
    workers = worker_env(command, env)
    assert workers["PYTORCH_CUDA_ALLOC_CONF"] == TRAIN_ALLOC_CONF
    worker = {**workers, "LOCAL_RANK": "1"}
    assert in_torchrun_worker(worker) and not in_torchrun_worker(env)
    use_training_allocator(worker)
    assert worker["PYTORCH_CUDA_ALLOC_CONF"] == TRAIN_ALLOC_CONF


def test_a_users_allocator_variable_is_kept_whichever_name_it_uses():
    for name in ALLOC_CONF_VARS:
        env = {name: "max_split_size_mb:128"}
        line = use_training_allocator(env)
        assert env == {name: "max_split_size_mb:128"}
        assert f"{name}=max_split_size_mb:128 (yours" in line
        assert not expandable_segments(env)
    assert expandable_segments({"PYTORCH_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:true"})
    # both names set and disagreeing: torch versions differ in which wins, so the promotion assumes the default
    assert not expandable_segments({"PYTORCH_CUDA_ALLOC_CONF": TRAIN_ALLOC_CONF,
                                    "PYTORCH_ALLOC_CONF": "expandable_segments:False"})
    assert not expandable_segments({})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_allocator_a_process_starts_with_is_the_one_promotion_sees():
    """A process started with the environment `kllama train` sets maps expandable segments, and promotion's check
    (`allocator_expandable`) says so; a user's `expandable_segments:False` is kept and seen as such."""
    probe = ("import torch; from kllama.train.promotion import allocator_expandable; "
             "x = torch.empty(64 * 2**20, dtype=torch.uint8, device='cuda'); "
             "print(allocator_expandable(), any(s.get('is_expandable', False) for s in torch.cuda.memory_snapshot()))")
    base = {k: v for k, v in os.environ.items() if k not in ALLOC_CONF_VARS}
    for user, want in (({}, "True True"), ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, "False False")):
        env = {**base, **user, "PYTHONPATH": str(REPO / "src")}
        use_training_allocator(env)
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-2:] == want.split(), (user, out.stdout)
