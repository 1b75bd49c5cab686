"""Data-parallel training on the CPU (gloo, 127.0.0.1) with real launchers and processes.

* `accelerate launch` with LLaMA-Factory's FSDP2 KTransformers config (its `kt_config` block removed, which stock
  accelerate refuses; CPU): two ranks give the loss and LoRA gradients of one process with the combined batch, and
  map one shared host copy of the routed experts.
* `FORCE_TORCHRUN=1 kllama train` on two simulated nodes (NNODES=2, rendezvous on loopback), and one process resuming
  its 2-rank checkpoint: the same adapter as the uninterrupted 2-rank run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_worker import CASES, expert_checksums, first_step, load_for_training, memory_config
from kllama.train.launch import free_port

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240
COMMON = ["stage=dpo", "dataset=dpo_en_demo", "template=deepseek", "cutoff_len=64", "max_samples=8",
          "per_device_train_batch_size=2", "logging_steps=1", "learning_rate=1e-2", "disable_tqdm=true",
          "lora_rank=4", "seed=7", "use_kt=true", "expert_placement=cpu", "report_to=none"]
# LLaMA-Factory's examples/ktransformers/accelerate/fsdp2_kt_bf16.yaml on a CPU machine with 2 processes
FSDP2_KT = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_version: 2
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: true
"""


def _env(**extra: str) -> dict[str, str]:
    """The launchers' environment: no GPU visible, so every rank trains on the CPU with gloo on any machine (with a
    GPU, each rank would take `cuda:LOCAL_RANK`: more ranks than GPUs is an error, two simulated nodes one GPU)."""
    launch_vars = ("FORCE_TORCHRUN", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def _check(code: int, text: str) -> str:
    assert code == 0, text[-4000:]
    return text


def _named_shm() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if "kllama" in name} if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[dict], set[str]]:
    """One 2-process job of dist_worker.py under `accelerate launch` (FSDP2 config): (model, per-rank results,
    /dev/shm names before it)."""
    model_dir = tiny_model_dir("deepseek_v2")
    out = tmp_path_factory.mktemp("two-ranks")
    (out / "fsdp2_kt.yaml").write_text(FSDP2_KT)
    shm = _named_shm()
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(out / "fsdp2_kt.yaml"),
         "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
         str(Path(__file__).parent / "dist_worker.py"), str(model_dir), str(out)],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=_env())
    text = _check(run.returncode, run.stdout + run.stderr)
    assert "accelerate FSDP config: kllama trains LoRA with DDP" in text
    return model_dir, [torch.load(out / f"rank{r}.pt") for r in (0, 1)], shm


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_give_the_loss_and_gradients_of_one_process_with_the_combined_batch(two_ranks, tmp_path, case):
    """DPO, SFT (token mean over the step), both micro-batched with a different pass count on each rank, and DPO in
    bf16 mixed precision (bf16 rounding: looser tolerances)."""
    model_dir, ranks, _ = two_ranks
    seen: list[bool] = []
    loss, grads = first_step(model_dir, tmp_path, case, world=1, autocast_seen=seen)
    assert any(".experts." in name for name in grads)  # expert LoRA (custom autograd backward) is all-reduced too
    bf16 = case.endswith("bf16")
    loss_rel = 1e-3 if bf16 else 1e-5
    for rank in ranks:
        rank_loss, rank_grads = rank[case]
        assert rank_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, name
            if bf16:
                # bf16 rounding scales with a tensor's magnitudes, not each element's: every element within 2 % of
                # the tensor's largest (measured: up to 0.6 %, bf16's step being 0.4 %; a missing all-reduce or
                # average would be off by 50-100 %); a per-element tolerance failed on one tiny element when
                # transformers 5.24 rounded the same sums differently
                torch.testing.assert_close(rank_grads[name], grad, rtol=0, atol=2e-2 * float(grad.abs().max()),
                                           msg=lambda text, name=name: f"{name}: {text}")
            else:
                torch.testing.assert_close(rank_grads[name], grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda text, name=name: f"{name}: {text}")
        assert rank_loss == pytest.approx(loss, rel=loss_rel)


def test_data_parallel_mixed_precision_computes_the_frozen_layers_as_one_process(two_ranks, tmp_path):
    """Under bf16, accelerate wraps the model's forward in autocast and DDP goes through it: a 2-rank run would
    compute the routers (frozen, fp32 by design) in bf16 where one process does not. The trainer takes that autocast
    off; only the LoRA branches autocast, in one process and in every rank alike."""
    model_dir, ranks, _ = two_ranks
    seen: list[bool] = []
    first_step(model_dir, tmp_path, "dpo_bf16", world=1, autocast_seen=seen)
    assert seen and not any(seen)
    for rank in ranks:
        assert rank["autocast_in_frozen_layers"] and not any(rank["autocast_in_frozen_layers"])


def test_the_ranks_of_a_node_map_one_copy_of_the_experts(two_ranks):
    model_dir, ranks, shm_before = two_ranks
    private = expert_checksums(load_for_training(memory_config(model_dir)).engine)  # one process, private buffers
    reports = [rank["memory"] for rank in ranks]
    size = reports[0]["host_bytes"]
    for report in reports:
        assert report["sums"] == private  # the other rank's experts are the checkpoint's, bit for bit
        mapped = report["mapped"]
        assert mapped["mappings"] == len(private)  # one mapping per MoE layer, in every rank
        assert mapped["size"] == mapped["rss"] == size  # each rank maps (and reads) all of it...
        assert abs(mapped["pss"] - size // 2) <= 4096  # ...and is charged half
    assert reports[0]["mapped"]["inodes"] == reports[1]["mapped"]["inodes"]  # one memory object...
    assert len(reports[0]["mapped"]["inodes"]) == 1
    assert abs(sum(r["mapped"]["pss"] for r in reports) - size) <= 8192  # ...allocated once on the node
    assert _named_shm() == shm_before  # anonymous shared memory: no name that could outlive the ranks


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def test_two_nodes_train_and_one_process_resumes_their_checkpoint(tiny_model_dir, tmp_path):
    """FORCE_TORCHRUN=1 kllama train on NNODES=2 (one process each, rendezvous on loopback), 4 steps with a
    checkpoint at 2; then one process with the combined batch resumes checkpoint-2: the same final adapter."""
    model_dir = tiny_model_dir("deepseek_v2")
    base = [sys.executable, "-m", "kllama", "train", f"model_name_or_path={model_dir}", *COMMON, "max_steps=4",
            "save_steps=2", "precompute_ref_log_probs=true"]
    both = tmp_path / "two"
    nodes = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NNODES": "2", "NPROC_PER_NODE": "1"}
    args = [*base, f"output_dir={both}", f"cache_dir={tmp_path / 'cache2'}"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env=_env(FORCE_TORCHRUN="1", NODE_RANK=str(node), **nodes)) for node in (0, 1)]
    outputs = []
    try:
        for proc in procs:
            text, _ = proc.communicate(timeout=TIMEOUT)  # reads to EOF and closes the pipe
            outputs.append((proc.returncode, text))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # a no-op after communicate
    node0 = _check(*outputs[0])
    node1 = _check(*outputs[1])
    assert "kllama: launching torchrun --nnodes 2 --node_rank 0 --nproc_per_node 1" in node0
    assert "distributed: 2 ranks (1 per node)" in node0 and "distributed:" not in node1  # rank 0 alone prints
    assert node0.count("layer                       mode") == 1  # the placement table, once
    assert {p.name for p in (both / "checkpoint-2").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    # One process with the 2 ranks' combined batch (the same 4 pairs per step) from the 2-rank checkpoint-2; the
    # reference log-probs are recomputed unsharded (another cache_dir).
    one = tmp_path / "one"
    one.mkdir()
    shutil.copytree(both / "checkpoint-2", one / "checkpoint-2")
    run = subprocess.run([*base, f"output_dir={one}", f"cache_dir={tmp_path / 'cache1'}",
                          "per_device_train_batch_size=4", "resume_from_checkpoint=true"],
                         capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=_env())
    text = _check(run.returncode, run.stdout + run.stderr)
    assert "distributed:" not in text and "resuming from" in text

    expected, resumed = _adapter(both), _adapter(one)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_more_ranks_per_node_than_gpus_is_one_clear_error(tiny_model_dir, tmp_path):
    """torchrun started by hand with one process more than the visible GPUs: each rank would take cuda:LOCAL_RANK,
    so the job stops before any rank touches a GPU, with kllama's error (said once) instead of CUDA's."""
    gpus = torch.cuda.device_count()
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus + 1),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "kllama", "train",
            f"model_name_or_path={tiny_model_dir('deepseek_v2')}", *COMMON, "max_steps=1", f"output_dir={tmp_path}"]
    env = {k: v for k, v in _env().items() if k != "CUDA_VISIBLE_DEVICES"}
    run = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env)
    text = run.stdout + run.stderr
    assert run.returncode != 0, text[-4000:]
    error = (f"kllama train: error: {gpus + 1} processes per node (torchrun --nproc_per_node, NPROC_PER_NODE or "
             f"accelerate's num_processes) but this machine shows {gpus} GPU")
    assert text.count(error) == 1, text[-4000:]
    assert 'CUDA_VISIBLE_DEVICES=""' in text and "invalid device ordinal" not in text, text[-4000:]
    assert not any(tmp_path.iterdir())  # stopped before anything was written
