"""`kllama train` starts torchrun itself, as LLaMA-Factory's `llamafactory-cli train` does.

With `FORCE_TORCHRUN=1`, or on a machine with more than one visible GPU, `kllama train cfg.yaml` runs
`python -m torch.distributed.run ... -m kllama train cfg.yaml` in a subprocess with LLaMA-Factory's variables:
`NNODES` (1), `NODE_RANK` (0), `NPROC_PER_NODE` (the GPU count; 1 without GPUs), `MASTER_ADDR` (127.0.0.1),
`MASTER_PORT` (a free port; required with several nodes). Inside a torchrun worker nothing is relaunched.
`CUDA_VISIBLE_DEVICES=0 kllama train ...` keeps a multi-GPU machine to one process.

Each rank trains on its own GPU (`cuda:LOCAL_RANK`), so a node with visible GPUs runs at most one process per GPU
(`check_processes_per_node`, here before torchrun starts and in every rank of a job started by hand); a node with no
visible GPU (`CUDA_VISIBLE_DEVICES=""`, or none installed) trains on the CPU with gloo, any number of processes.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence

from kllama.errors import KllamaError

_TRUE = ("1", "true", "yes")
# set by torchrun (and accelerate launch) in every worker it starts
_WORKER_VARS = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def visible_gpus() -> int:
    """CUDA devices this process may use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_processes_per_node(nproc: int, gpus: int) -> None:
    """Refuse `nproc` processes on a node that shows `gpus` GPUs when there are fewer GPUs than processes (0 GPUs:
    a CPU run, which takes any number)."""
    if 0 < gpus < nproc:
        raise KllamaError(
            f"{nproc} processes per node (torchrun --nproc_per_node, NPROC_PER_NODE or accelerate's num_processes) but "
            f"this machine shows {gpus} GPU{'s' if gpus > 1 else ''} and each process trains on its own GPU; launch at "
            f"most {gpus} per node, or set CUDA_VISIBLE_DEVICES=\"\" to train on the CPU (gloo)")


def free_port() -> int:
    """A TCP port nothing listens on now (for a single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _int_var(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise KllamaError(f"{name}={raw!r} is not a whole number; set it to e.g. {default}") from None
    if value < minimum:
        raise KllamaError(f"{name}={value} must be at least {minimum}")
    return value


def in_torchrun_worker(env: Mapping[str, str]) -> bool:
    """Whether `env` is that of a process torchrun (or accelerate launch) started."""
    return any(var in env for var in _WORKER_VARS)


def torchrun_command(argv: Sequence[str], env: Mapping[str, str] | None = None, gpus: int | None = None,
                     ) -> list[str] | None:
    """The torchrun command line that runs `kllama <argv>` data-parallel, or None when this process should train
    itself (no FORCE_TORCHRUN and at most one GPU, or already a torchrun worker)."""
    env = os.environ if env is None else env
    if in_torchrun_worker(env):
        return None
    gpus = visible_gpus() if gpus is None else gpus
    if env.get("FORCE_TORCHRUN", "0").lower() not in _TRUE and gpus <= 1:
        return None
    nnodes = _int_var(env, "NNODES", 1, 1)
    node_rank = _int_var(env, "NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise KllamaError(f"NODE_RANK={node_rank} but NNODES={nnodes}; node ranks run from 0 to NNODES-1")
    if nnodes > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise KllamaError(f"NNODES={nnodes}: set MASTER_ADDR (node 0's address) and MASTER_PORT to the same values "
                          "on every node")
    nproc = _int_var(env, "NPROC_PER_NODE", max(gpus, 1), 1)
    check_processes_per_node(nproc, gpus)
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
        "--master_addr", env.get("MASTER_ADDR") or "127.0.0.1",
        "--master_port", env.get("MASTER_PORT") or str(free_port()),
        "-m", "kllama", *argv,
    ]


def worker_env(command: list[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the workers: torchrun would give each one OMP_NUM_THREADS=1 (with a warning); unless the
    user chose, each of the node's ranks gets its share of the physical cores for CPU-side work instead."""
    import psutil

    out = dict(os.environ if env is None else env)
    if not out.get("OMP_NUM_THREADS"):
        nproc = int(command[command.index("--nproc_per_node") + 1])
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        out["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    return out


def launch(command: list[str]) -> int:
    """Run the torchrun command in the foreground and return its exit status."""
    print(f"kllama: launching torchrun {' '.join(command[3:])}", flush=True)  # after `python -m torch.distributed.run`
    return subprocess.run(command, env=worker_env(command), check=False).returncode
