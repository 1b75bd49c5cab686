"""`kllama train` starting torchrun from LLaMA-Factory's variables, and a process's ranks from torchrun's."""
from __future__ import annotations

import pytest

from kllama.errors import KllamaError
from kllama.train.distributed import DistInfo, dist_info
from kllama.train.launch import torchrun_command, worker_env

ARGV = ["train", "cfg.yaml", "max_steps=3"]


def _flags(command: list[str]) -> dict[str, str]:
    head = command[3:command.index("-m", 3)]
    return dict(zip(head[::2], head[1::2]))


def test_one_gpu_without_force_trains_in_this_process():
    assert torchrun_command(ARGV, {}, gpus=1) is None
    assert torchrun_command(ARGV, {"FORCE_TORCHRUN": "0"}, gpus=0) is None


def test_force_torchrun_on_a_cpu_machine_defaults_to_one_process_per_node():
    command = torchrun_command(ARGV, {"FORCE_TORCHRUN": "1"}, gpus=0)
    assert command[1:3] == ["-m", "torch.distributed.run"] and command[-5:] == ["-m", "kllama", *ARGV]
    flags = _flags(command)
    assert flags["--nnodes"] == "1" and flags["--node_rank"] == "0" and flags["--nproc_per_node"] == "1"
    assert flags["--master_addr"] == "127.0.0.1" and int(flags["--master_port"]) > 0


def test_several_gpus_launch_one_process_each_as_llamafactory_does():
    assert _flags(torchrun_command(ARGV, {}, gpus=4))["--nproc_per_node"] == "4"
    env = {"FORCE_TORCHRUN": "true", "NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    flags = _flags(torchrun_command(ARGV, env, gpus=8))
    assert flags == {"--nnodes": "2", "--node_rank": "1", "--nproc_per_node": "2", "--master_addr": "10.0.0.1",
                     "--master_port": "29500"}


def test_a_torchrun_worker_never_relaunches():
    assert torchrun_command(ARGV, {"FORCE_TORCHRUN": "1", "LOCAL_RANK": "0"}, gpus=2) is None


@pytest.mark.parametrize("env,needle", [
    ({"NNODES": "2"}, "MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "NODE_RANK=2"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two'"),
    ({"NPROC_PER_NODE": "0"}, "at least 1"),
])
def test_bad_launch_variables_are_clear_errors(env, needle):
    with pytest.raises(KllamaError, match=needle):
        torchrun_command(ARGV, {"FORCE_TORCHRUN": "1", **env}, gpus=0)


def test_more_processes_per_node_than_gpus_is_refused_before_launching():
    with pytest.raises(KllamaError, match=r"3 processes per node .* shows 2 GPUs .* at most 2 per node, or set "
                                          r'CUDA_VISIBLE_DEVICES="" to train on the CPU \(gloo\)'):
        torchrun_command(ARGV, {"NPROC_PER_NODE": "3"}, gpus=2)
    with pytest.raises(KllamaError, match="shows 1 GPU and"):
        torchrun_command(ARGV, {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, gpus=1)
    # one process per GPU or fewer, or no visible GPU at all (the CPU with gloo, any count) launch as asked
    for nproc, gpus in ((2, 2), (1, 2), (4, 0)):
        command = torchrun_command(ARGV, {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(nproc)}, gpus=gpus)
        assert _flags(command)["--nproc_per_node"] == str(nproc)


def test_workers_get_a_share_of_the_cores_unless_the_user_chose():
    command = torchrun_command(ARGV, {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, gpus=0)
    assert int(worker_env(command, {})["OMP_NUM_THREADS"]) >= 1
    assert worker_env(command, {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"


def test_ranks_come_from_torchrun_variables():
    assert dist_info({}) == DistInfo() and not DistInfo().enabled
    info = dist_info({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert info == DistInfo(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert info.enabled and not info.is_main and not info.is_local_main
