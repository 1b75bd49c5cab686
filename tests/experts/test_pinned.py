"""Host expert buffers are not inherited by forked children (DataLoader workers, `datasets.map(num_proc=...)`).

Linux copies pinned pages eagerly at fork, so a process holding tens of GB of pinned experts that forks workers is
OOM-killed; `host_empty` marks its buffers MADV_DONTFORK (kllama.experts.pinned). These tests fork for real.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from kllama.experts.pinned import host_empty

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/smaps").exists() or not hasattr(os, "fork"),
                       reason="reads Linux /proc and forks"),
    # these tests fork on purpose (what DataLoader workers do); Python 3.12 warns about forking a process that has
    # threads, which torch's CUDA and intra-op pools start on a GPU machine (4 warnings in the H200 box's suite)
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"),
]
MIB = 2**20


def mapping_flags(address: int) -> set[str] | None:
    """VmFlags of this process's mapping that contains `address` (None when nothing maps it)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    return None


def in_child(fn) -> str:  # noqa: ANN001
    """Run `fn()` in a forked child and return what it returned (a short string)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.write(write, str(fn()).encode())
        finally:
            os._exit(0)
    os.close(write)
    out = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    return out


def test_host_buffer_is_marked_dontfork_and_absent_in_a_forked_child():
    buf = host_empty(64 * MIB // 2, torch.bfloat16, pin=True)
    buf.fill_(1.5)  # fault every page in
    plain = torch.ones(16 * MIB // 4)  # ordinary memory: a child does inherit it (the check below can see mappings)
    flags = mapping_flags(buf.data_ptr())
    assert flags is not None and "dc" in flags  # "dc" = do not copy this area on fork
    assert "dc" not in (mapping_flags(plain.data_ptr()) or {"dc"})
    child = in_child(lambda: f"{mapping_flags(buf.data_ptr()) is not None},{mapping_flags(plain.data_ptr()) is not None}")
    assert child == "False,True"
    assert float(buf[-1]) == 1.5 and buf.data_ptr() % 4096 == 0  # the parent keeps its data, page-aligned


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    reason="this kernel has no transparent huge pages")
def test_host_buffers_of_a_huge_page_or_more_are_advised_huge_pages():
    big = host_empty(4 * MIB, torch.uint8, pin=True)
    small = host_empty(MIB, torch.uint8, pin=True)  # below one huge page: left alone
    opted_out = host_empty(4 * MIB, torch.uint8, pin=True, huge=False)
    for buf in (big, small, opted_out):
        buf.fill_(7)
    # "hg" = MADV_HUGEPAGE given; the advice is what kllama controls (whether 2 MiB pages were free is the kernel's)
    assert "hg" in mapping_flags(big.data_ptr()) and "dc" in mapping_flags(big.data_ptr())
    assert "hg" not in mapping_flags(small.data_ptr())
    assert "hg" not in mapping_flags(opted_out.data_ptr()) and "dc" in mapping_flags(opted_out.data_ptr())
    assert int(big.sum()) == 7 * 4 * MIB


def test_forked_child_rss_does_not_include_host_buffers():
    def rss_kib() -> int:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0])

    buf = host_empty(128 * MIB, torch.uint8, pin=True)
    buf.fill_(7)
    parent = rss_kib()
    child = int(in_child(rss_kib))
    assert parent - child > 100 * MIB // 1024, (parent, child)


class _Probe(torch.utils.data.Dataset):
    """Each item reports whether the worker process that produced it can see the parent's host buffer."""

    def __init__(self, address: int) -> None:
        self.address = address

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mapped = mapping_flags(self.address) is not None
        return {"i": torch.tensor(i), "pid": torch.tensor(os.getpid()), "mapped": torch.tensor(mapped)}


def test_dataloader_workers_run_in_a_process_holding_host_buffers():
    buf = host_empty(32 * MIB, torch.uint8, pin=True)
    buf.fill_(3)
    loader = DataLoader(_Probe(buf.data_ptr()), batch_size=2, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    assert sorted(int(i) for b in batches for i in b["i"]) == list(range(8))
    assert {int(p) for b in batches for p in b["pid"]} - {os.getpid()}, "items did not come from worker processes"
    assert not any(bool(m) for b in batches for m in b["mapped"])
    assert int(buf.sum()) == 3 * 32 * MIB


def test_loaded_experts_live_in_dontfork_buffers(tiny_model_dir):
    from kllama.experts.placement import ExpertPlacement
    from kllama.model.meta_load import load_checkpoint
    from kllama.model.source import read_model_source

    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = read_model_source(tiny_model_dir("deepseek_v2"), trust_remote_code=False)
    _, engine = load_checkpoint(source, compute_device=device, dtype=torch.float32, show_progress=False,
                                placements_fn=lambda names: {n: ExpertPlacement.from_mode("cpu") for n in names})
    for module in engine.modules.values():
        for weight in module.host_weights():
            assert "dc" in (mapping_flags(weight.data_ptr()) or set()), module.name
