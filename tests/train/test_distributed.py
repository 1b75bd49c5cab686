"""Data-parallel training on the CPU (gloo, 127.0.0.1) with real torchrun processes: the same step as one process
with the combined batch, checkpoints resumable with another rank count, `FORCE_TORCHRUN`, and two nodes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_worker import CASES, first_step
from kllama.train.launch import free_port

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240
COMMON = ["stage=dpo", "dataset=dpo_en_demo", "template=deepseek", "cutoff_len=64", "max_samples=8",
          "per_device_train_batch_size=2", "logging_steps=1", "learning_rate=1e-2", "disable_tqdm=true",
          "lora_rank=4", "seed=7", "use_kt=true", "expert_placement=cpu", "report_to=none"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_TORCHRUN", "NNODES", "NODE_RANK", "NPROC_PER_NODE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _check(out: subprocess.CompletedProcess | tuple[int, str]) -> str:
    code, text = (out.returncode, out.stdout + out.stderr) if isinstance(out, subprocess.CompletedProcess) else out
    assert code == 0, text[-4000:]
    return text


def kllama_train(*args: str, **env: str) -> str:
    """`kllama train ARGS` (stdout + stderr), which may start torchrun itself."""
    return _check(subprocess.run([sys.executable, "-m", "kllama", "train", *args], capture_output=True, text=True,
                                 timeout=TIMEOUT, cwd=REPO, env=_env(**env)))


def test_two_ranks_give_the_loss_and_gradients_of_one_process_with_the_combined_batch(tiny_model_dir, tmp_path):
    """DPO, SFT (token mean over the step) and micro-batched DPO whose ranks run a different number of passes."""
    model_dir = tiny_model_dir("deepseek_v2")
    _check(subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(Path(__file__).parent / "dist_worker.py"), str(model_dir),
         str(tmp_path)],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=_env()))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for case in CASES:
        loss, grads = first_step(model_dir, tmp_path / f"single-{case}", case, world=1)
        assert any(".experts." in name for name in grads)  # expert LoRA (custom autograd backward) is all-reduced too
        for rank in ranks:
            rank_loss, rank_grads = rank[case]
            assert rank_grads.keys() == grads.keys()
            for name, grad in grads.items():
                assert grad.abs().sum() > 0, name
                torch.testing.assert_close(rank_grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{case} {name}")
            assert rank_loss == pytest.approx(loss, rel=1e-5), case


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def test_force_torchrun_trains_on_two_processes_and_one_process_resumes_its_checkpoint(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("deepseek_v2")
    base = [f"model_name_or_path={model_dir}", *COMMON, "max_steps=4", "save_steps=2", "precompute_ref_log_probs=true"]
    both = tmp_path / "two"
    text = kllama_train(*base, f"output_dir={both}", f"cache_dir={tmp_path / 'cache2'}", FORCE_TORCHRUN="1",
                        NPROC_PER_NODE="2")
    assert "launching torchrun" in text and "distributed: 2 ranks (2 per node)" in text
    assert text.count("layer                       mode") == 1  # the placement table, printed by rank 0 only
    assert {p.name for p in (both / "checkpoint-2").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    # One process with the 2 ranks' combined batch (the same 4 pairs per step), from the 2-rank checkpoint-2; the
    # reference log-probs are recomputed unsharded (another cache_dir).
    one = tmp_path / "one"
    one.mkdir()
    shutil.copytree(both / "checkpoint-2", one / "checkpoint-2")
    text = kllama_train(*base, f"output_dir={one}", f"cache_dir={tmp_path / 'cache1'}", "per_device_train_batch_size=4",
                        "resume_from_checkpoint=true")
    assert "distributed:" not in text and "resuming from" in text

    expected, resumed = _adapter(both), _adapter(one)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_two_nodes_rendezvous_on_loopback(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("deepseek_v2")
    args = [sys.executable, "-m", "kllama", "train", f"model_name_or_path={model_dir}", *COMMON, "max_steps=1",
            f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}"]
    nodes = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NNODES": "2", "NPROC_PER_NODE": "1"}
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env=_env(FORCE_TORCHRUN="1", NODE_RANK=str(node), **nodes)) for node in (0, 1)]
    outputs = []
    try:
        for proc in procs:
            outputs.append((proc.wait(timeout=TIMEOUT), proc.stdout.read()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    node0 = _check(outputs[0])
    _check(outputs[1])
    assert "--nnodes 2 --node_rank 0" in node0 and "distributed: 2 ranks (1 per node)" in node0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
