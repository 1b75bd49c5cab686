"""Data-parallel training: who this process is (from torchrun's environment), the process group, and the few
collectives kllama needs around transformers' Trainer (which brings its own DDP, sampler and gradient all-reduce).

Launch with `torchrun --nproc_per_node N -m kllama train cfg.yaml` (or `FORCE_TORCHRUN=1 kllama train cfg.yaml`, see
`kllama.train.launch`). Every helper here is a no-op in a single process, so the single-GPU path is unchanged.
One process speaks: ranks other than 0 print nothing on stdout (errors and warnings still go to stderr).
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kllama.errors import KllamaError
from kllama.train.launch import check_processes_per_node, visible_gpus

_TRUE = ("1", "true", "yes")
_QUIET_RANK_DELAY_S = 5.0  # how long ranks other than local rank 0 wait before raising a launch error
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (all zeros and ones in a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the process that writes outputs and prints."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: the process that loads what a node shares (the routed experts)."""
        return self.local_rank == 0


def dist_info(env: dict[str, str] | None = None) -> DistInfo:
    """This process's ranks from torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("NPROC_PER_NODE", str(world))))
    return DistInfo(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                    local_world_size=local_world)


def init_distributed(timeout_s: float) -> DistInfo:
    """Join the torchrun job this process belongs to (a no-op in a single process) and return its ranks.

    Each rank takes `cuda:LOCAL_RANK` (NCCL) or, without a visible GPU, the CPU (gloo); more ranks per node than
    visible GPUs is a `KllamaError` (said by local rank 0; the others wait a moment, so it is said once). The
    Trainer's accelerate state finds the group already initialised and uses it. An accelerate FSDP launch
    (`ACCELERATE_USE_FSDP=true`, as LLaMA-Factory's `fsdp2_kt_*.yaml` configs set) runs as DDP: LoRA adapters are
    small, so non-expert weights are replicated on each GPU and the routed experts stay in host memory shared by the
    node's ranks.
    """
    info = dist_info()
    if not info.is_main:
        sys.stdout = io.TextIOWrapper(open(os.devnull, "wb"), write_through=True)  # noqa: SIM115 - lives as long as the process
        os.environ["TQDM_DISABLE"] = "1"  # progress bars that do not set `disable` themselves
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in _TRUE:
        os.environ["ACCELERATE_USE_FSDP"] = "false"  # read by the Trainer's Accelerator
        print("accelerate FSDP config: kllama trains LoRA with DDP (non-expert weights replicated on each GPU, "
              "routed experts in host memory shared per node)", flush=True)
    if not info.enabled:
        return info
    try:
        check_processes_per_node(info.local_world_size, visible_gpus())
    except KllamaError:
        if not info.is_local_main:  # local rank 0 says it; torchrun stops the other ranks when it exits
            time.sleep(_QUIET_RANK_DELAY_S)
        raise
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        # binding the group to this rank's GPU lets every barrier know its device (without it torch warns at each)
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=torch.device("cuda", info.local_rank) if cuda else None)
    where = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    print(f"distributed: {info.world_size} ranks ({info.local_world_size} per node), rank 0 on {where}, "
          f"backend {dist.get_backend()}", flush=True)
    return info


def expert_memory_per_node(info: DistInfo, use_kt: bool) -> contextlib.AbstractContextManager:
    """The block to load the model in: with the expert engine and several ranks per node, routed experts go to one
    host copy per node (`kllama.experts.shared_host`; local rank 0 loads first, the others map its pages)."""
    if not (use_kt and info.local_world_size > 1):
        return contextlib.nullcontext()
    from kllama.experts.shared_host import node_shared_experts

    # torchrun numbers the ranks of a node consecutively: local rank 0 of this node is global rank - local rank
    return node_shared_experts(leader_rank=info.rank - info.local_rank, is_leader=info.is_local_main)


def shutdown_distributed() -> None:
    """Wait for every rank, then leave the process group (so no rank exits while rank 0 still writes)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def world_size() -> int:
    """Processes training together (1 in a single process)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0 and in a single process."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def in_rank_order(info: DistInfo) -> Iterator[None]:
    """Run the block on rank 0 first, then on each node's local rank 0, then on the other ranks.

    For work that writes a cache the later ranks read (tokenized datasets): rank 0 builds it, the rest load it;
    nodes without a shared filesystem get one builder each. Every rank passes exactly two barriers.
    """
    stage = 0 if info.is_main else 1 if info.is_local_main else 2
    if not info.enabled:
        yield
        return
    for _ in range(stage):
        dist.barrier()
    try:
        yield
    finally:
        for _ in range(2 - stage):
            dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank (picklable objects; `[obj]` in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def my_share(items: Sequence[T]) -> Sequence[T]:
    """This rank's items when a pass over `items` is split across ranks (every world_size-th, from its rank on)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return items
    return items[dist.get_rank()::dist.get_world_size()]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def decoder_outputs(model: nn.Module, lm: nn.Module, **inputs: Any) -> Any:
    """`lm.model(**inputs)` (the decoder's output: last hidden state, router logits), run through `model`'s DDP
    wrapper when it has one.

    DDP all-reduces gradients only for a forward that goes through its own `forward` (that is where it prepares the
    backward); kllama computes log-probs from the decoder's hidden states in chunks rather than from full logits, so
    the wrapper runs the whole causal LM with an empty `logits_to_keep` (no logits at all) and a forward hook hands
    back the decoder's output.
    """
    if not isinstance(model, DistributedDataParallel):
        return lm.model(**inputs)
    captured: list[Any] = []
    handle = lm.model.register_forward_hook(lambda _module, _args, out: captured.append(out))
    try:
        none = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
        model(**inputs, logits_to_keep=none)
    finally:
        handle.remove()
    return captured[-1]


# logged metric -> how the values of all ranks combine into the one logged number
_COMBINE = {"tokens_per_second": sum, "peak_host_memory_gb": max, "peak_gpu_memory_gb": max}


def combine_rank_metrics(values: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    """kllama's logged metrics of all ranks as one: throughput summed, peak memory the maximum, everything else the
    mean weighted by how many micro-steps each rank averaged (`counts`, 1 when absent). Every rank calls it at the
    same point (the Trainer logs on every rank); in a single process it returns `values`."""
    gathered = gather_objects((values, counts))
    if len(gathered) == 1:
        return values
    out = {}
    for key in values:
        pairs = [(g[key], c.get(key, 1)) for g, c in gathered if key in g]
        combine = _COMBINE.get(key)
        if combine is not None:
            out[key] = combine(v for v, _ in pairs)
        else:
            total = sum(c for _, c in pairs)
            out[key] = sum(v * c for v, c in pairs) / max(total, 1)
    return out
