"""benchmarks/layer_split.py: the per layer / fixed split of packed_pass.py's profiled steps across layer counts."""
from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch


@pytest.fixture(scope="module")
def split(benchmark_script) -> ModuleType:  # noqa: ANN001
    return benchmark_script("layer_split")


def test_line_fit_by_hand(split: ModuleType) -> None:
    # two points: the line through them
    assert split.line_fit([4.0, 8.0], [10.0, 18.0]) == pytest.approx((2.0, 2.0))
    # three points (2,1) (4,3) (6,2): mean (4, 2), Sxx = 8, Sxy = (-2)(-1) + 0 + (2)(0) = 2 -> slope 1/4, intercept 1
    assert split.line_fit([2.0, 4.0, 6.0], [1.0, 3.0, 2.0]) == pytest.approx((0.25, 1.0))


@pytest.mark.parametrize(("name", "expected"), [
    # names as the H200 box's profile of packed_pass.py printed them (results/packed_pass_v2lite_4layers_h200_s7_*)
    ("Memcpy HtoD (Pinned -> Device)", "host->device copies"),
    ("aten::_efficient_attention_backward", "attention bwd"),
    ("aten::_flash_attention_backward", "attention bwd"),
    ("aten::_cudnn_attention_forward", "attention fwd"),
    ("aten::_efficient_attention_forward", "attention fwd"),
    ("aten::_scaled_dot_product_attention_math", "attention fwd"),
    ("aten::mm", "GEMM"), ("aten::addmm", "GEMM"), ("aten::_grouped_mm", "GEMM"),
    ("aten::mul", "elementwise"), ("aten::add_", "elementwise"), ("aten::sub_", "elementwise"),
    ("aten::copy_", "elementwise"), ("aten::_to_copy", "elementwise"), ("aten::exp_", "elementwise"),
    ("aten::rsqrt", "norms"), ("aten::_fused_rms_norm", "norms"),
    ("aten::topk", "other"), ("Memcpy DtoD (Device -> Device)", "other"), ("MmBackward0", "other"),
    ("aten::mean", "norms"), ("aten::mm_backward_like", "other"),
])
def test_op_classes_by_name(split: ModuleType, name: str, expected: str) -> None:
    assert split.op_class(name) == expected


def _row(name: str, layers: int, s_per_step: float | None, ops: dict[str, float] | None) -> dict:
    row = {"name": name, "placement": "stream", "layers": layers}
    if s_per_step is not None:
        row["s_per_step"] = s_per_step
    if ops is not None:
        row["profile"] = {"ops": [{"name": k, "ms": v, "calls": 1} for k, v in ops.items()]}
    return row


def test_split_fits_each_op_class_and_step(split: ModuleType) -> None:
    rows = [
        _row("packed", 4, 0.30, {"aten::mm": 60.0, "aten::mul": 9.0, "aten::_flash_attention_backward": 20.0}),
        _row("packed", 8, 0.50, {"aten::mm": 100.0, "aten::mul": 13.0, "aten::_flash_attention_backward": 40.0,
                                 "aten::topk": 2.0}),
        _row("padded", 4, 0.40, {"aten::mm": 70.0}),
        _row("padded", 8, None, None),  # skipped by the time budget: no fit from one count
    ]
    splits = split.layer_splits(rows, 26)
    assert [s["name"] for s in splits] == ["packed"]
    packed = splits[0]
    # step: 300 ms at 4, 500 at 8 -> 50 ms a layer, 100 fixed, 100 + 26 * 50 = 1,400 at full depth
    assert packed["step"]["per_layer_ms"] == pytest.approx(50.0) and packed["step"]["fixed_ms"] == pytest.approx(100.0)
    assert packed["step"]["projected_ms"] == pytest.approx(1400.0)
    ops = {op["name"]: op for op in packed["ops"]}
    assert ops["aten::mm"]["per_layer_ms"] == pytest.approx(10.0) and ops["aten::mm"]["fixed_ms"] == pytest.approx(20.0)
    assert ops["aten::topk"]["measured_ms"] == [0.0, 2.0]  # absent at 4 layers: 0 ms there
    assert [op["name"] for op in packed["ops"]] == ["aten::mm", "aten::_flash_attention_backward", "aten::mul",
                                                    "aten::topk"]  # by per-layer cost: 10, 5, 1, 0.5
    classes = {c["name"]: c for c in packed["classes"]}
    assert set(classes) == {"GEMM", "attention bwd", "elementwise", "other"}
    assert classes["attention bwd"]["projected_ms"] == pytest.approx(0.0 + 5.0 * 26)
    assert packed["total"]["measured_ms"] == [89.0, 155.0]
    text = split.format_split(packed, "self CUDA")
    assert "projected at 26" in text and "aten::_flash_attention_backward" in text and "attention bwd" in text


def test_op_times_of_a_real_cpu_profile(split: ModuleType) -> None:
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU], acc_events=True) as prof:
        for _ in range(3):
            (a @ a).mul_(2.0)
    rows = {row["name"]: row for row in split.op_times(list(prof.events()), torch.device("cpu"))}
    averages = {e.key: e for e in prof.key_averages()}
    assert rows["aten::mm"]["calls"] == 3 and rows["aten::mul_"]["calls"] == 3
    for name in ("aten::mm", "aten::mul_"):
        assert math.isclose(rows[name]["ms"], averages[name].self_cpu_time_total / 1e3, rel_tol=1e-6)


def test_op_times_count_each_device_record_once_whoever_lists_it(split: ModuleType) -> None:
    """Profiler events as torch builds them (`FunctionEvent`), with the listings the H200 box's profiles showed: a
    GEMM kernel under `aten::matmul`, `aten::mm` and the `cudaLaunchKernel` that launched it, and a pinned copy
    under `aten::copy_` and `cudaMemcpyAsync`. Each device record counts once: the kernel for `aten::mm` (the
    innermost op, though it starts in its parent's microsecond), the copy as its own row; device time no op lists
    is `OUTSIDE_OPS`; the rows sum to the device time."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    ids = iter(range(100))

    def host(name: str, start: float, end: float, kernels: list[tuple[str, float]]) -> FunctionEvent:
        event = FunctionEvent(next(ids), name, thread=0, start_us=start, end_us=end)
        for kernel, duration in kernels:
            event.append_kernel(kernel, 0, duration)
        return event

    def device(name: str, start: float, duration: float) -> FunctionEvent:
        return FunctionEvent(next(ids), name, thread=7, start_us=start, end_us=start + duration,
                             device_type=DeviceType.CUDA)

    def nest(parent: FunctionEvent, child: FunctionEvent) -> FunctionEvent:
        child.set_cpu_parent(parent)
        parent.append_cpu_child(child)
        return child

    gemm, copy = "nvjet_sm90_tst_256x128", "Memcpy HtoD (Pinned -> Device)"
    copy_op = host("aten::copy_", 0.0, 20.0, [(copy, 1229.792)])
    matmul = host("aten::matmul", 30.0, 60.0, [(gemm, 170.5)])
    mm = nest(matmul, host("aten::mm", 30.0, 59.0, [(gemm, 170.5)]))  # starts in its parent's microsecond
    events = [
        copy_op,
        nest(copy_op, host("cudaMemcpyAsync", 5.0, 15.0, [(copy, 1229.792)])),
        matmul,
        mm,
        nest(mm, host("cudaLaunchKernel", 40.0, 45.0, [(gemm, 170.5)])),
        host("aten::add_", 70.0, 80.0, [("elementwise_add", 4.5)]),
        device(copy, 100.0, 1229.792),
        device(gemm, 1400.0, 170.5),
        device("elementwise_add", 1600.0, 4.5),
        device("nccl_or_other_unlisted", 1700.0, 12.0),
    ]
    rows = {row["name"]: row for row in split.op_times(events, torch.device("cuda"))}
    assert rows[copy]["calls"] == 1 and rows[copy]["ms"] == pytest.approx(1.229792)
    assert rows["aten::mm"]["calls"] == 1 and rows["aten::mm"]["ms"] == pytest.approx(0.1705)
    assert "aten::matmul" not in rows and "cudaLaunchKernel" not in rows and "cudaMemcpyAsync" not in rows
    assert rows["aten::add_"]["ms"] == pytest.approx(0.0045)
    assert rows[split.OUTSIDE_OPS]["ms"] == pytest.approx(0.012)
    assert sum(row["ms"] for row in rows.values()) == pytest.approx((1229.792 + 170.5 + 4.5 + 12.0) / 1e3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_op_times_on_cuda_count_each_kernel_once_with_transfers_apart(split: ModuleType) -> None:
    """Each kernel counts once, for the op that launched it; the pinned host->device copy is a row of its own (its
    op `aten::copy_` also casts on the device, a different cost); the rows add up to the device's kernel time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    host = torch.randn(4096, 4096).pin_memory()
    a = torch.randn(1024, 1024, device=device)
    (a @ a).add_(host.to(device)[:1024, :1024])  # warm-up, as the benchmarks' profiled steps have: on the H200 box
    # the first launch of each kernel in a process went unattributed (2 of 3 calls counted)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=True) as prof:
        on_device = host.to(device, non_blocking=True)
        for _ in range(3):
            (a @ a).add_(on_device[:1024, :1024])
        torch.cuda.synchronize()
    events = list(prof.events())
    rows = {row["name"]: row for row in split.op_times(events, device)}
    copies = [name for name in rows if name.startswith("Memcpy HtoD")]
    assert len(copies) == 1 and rows[copies[0]]["calls"] == 1, rows
    assert split.op_class(copies[0]) == "host->device copies"
    assert rows["aten::mm"]["calls"] == 3 and rows["aten::mm"]["ms"] > 0 and rows["aten::add_"]["calls"] == 3, rows
    kernels_ms = sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA
                     and not getattr(e, "is_user_annotation", False)) / 1e3
    assert math.isclose(sum(row["ms"] for row in rows.values()), kernels_ms, rel_tol=1e-6), (rows, kernels_ms)
