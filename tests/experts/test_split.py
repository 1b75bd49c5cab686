"""Long no-grad passes split between the CPU (experts [0, k)) and the streamed GPU slot ([k, E)): the math equals
the unsplit pass, and the cost model picks k as derived by hand."""
from __future__ import annotations

import pytest
import torch

from kllama.experts import ExpertPlacement, HostExperts
from kllama.experts.cpu_share import (CPU_OVERLAPS_COPY, CPU_SLOWDOWN, HOST_GAP_S, MIN_GAIN, SplitModel,
                                      per_expert_seconds)
from kllama.experts.crossover import Crossovers, cpu_expert_seconds
from kllama.experts.quant import dequantize, quantize
from kllama.experts.routed import LoraFactors, expert_factors, routed_experts_math
from kllama.experts.split_pass import (HostStaging, SplitExecutor, cpu_share_rows, run_on_worker, split_forward,
                                       submit_cpu_side)

E, H, I, K = 8, 64, 48, 2  # noqa: E741
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def layer(dtype: torch.dtype, with_lora: bool, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) * 0.2).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) * 0.2).to(dtype)
    lora = {}
    if with_lora:
        for target, (n_in, n_out) in {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}.items():
            lora[target] = LoraFactors(torch.randn(E * 4, n_in, generator=gen) * 0.3,
                                       torch.randn(n_out, E * 4, generator=gen) * 0.3, 0.5)
    return gate_up, down, lora


def routing(tokens: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(tokens, E, generator=gen).topk(K, dim=-1).indices, torch.rand(tokens, K, generator=gen))


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_lora", [False, True])
def test_split_pass_equals_the_unsplit_pass(scheme: str | None, dtype: torch.dtype, with_lora: bool) -> None:
    # experts [0, k) through the CPU pass on the host weights (quantized as stored), [k, E) through the grouped-GEMM
    # pass on the device with the slot's weights (dequantized [k, E)), against the stream pass on all of them
    gate_up, down, lora = layer(dtype, with_lora)
    host = (gate_up, down) if scheme is None else (quantize(gate_up, scheme, projections=2), quantize(down, scheme))
    dense = [dequantize(w) for w in host]  # what a streamed slot holds
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    index, weights = routing(40)
    silu = torch.nn.functional.silu
    device_lora = {t: LoraFactors(f.lora_A.to(DEVICE), f.lora_B.to(DEVICE), f.scaling) for t, f in lora.items()}
    host_lora = {t: expert_factors(f, E, dtype) for t, f in lora.items()}
    xd, idx, w = x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE)
    expected = routed_experts_math(xd, idx, w, *(d.to(DEVICE) for d in dense), silu, device_lora)
    tol = 1e-5 if dtype == torch.float32 and scheme is None else 2e-2
    for first in (0, 1, 3, E):
        slot = tuple(d[first:].to(DEVICE) for d in dense)
        got = split_forward(xd, idx, w, first, host, slot, silu, device_lora, host_lora)
        assert got.shape == expected.shape and got.dtype == expected.dtype and got.device == expected.device
        assert rel(got, expected) < tol, first
    if scheme is None and not lora:  # the CPU side's experts count: zero host weights change the result
        zeros = (torch.zeros_like(gate_up), torch.zeros_like(down))
        partial = split_forward(xd, idx, w, 3, zeros, tuple(d[3:].to(DEVICE) for d in dense), silu)
        assert rel(partial, expected) > 1e-2


def test_the_tail_of_the_factors_holds_the_last_experts_deltas_in_pefts_layout() -> None:
    # PEFT's layout by hand: expert e owns A's rows e*r:(e+1)*r and B's columns e, e+E, e+2E, ... (rank 4 here)
    _, _, lora = layer(torch.float32, with_lora=True)
    for factors in lora.values():
        for first in (0, 3, E - 1):
            tail = expert_factors(factors, E, torch.float32).tail(first)
            assert tail.a.shape[0] == tail.b.shape[0] == E - first
            for j, e in enumerate(range(first, E)):
                expect = factors.scaling * factors.lora_B[:, e::E] @ factors.lora_A[4 * e : 4 * (e + 1)]
                torch.testing.assert_close(tail.b[j] @ tail.a[j], expect, rtol=1e-5, atol=1e-6)


def model(per_expert_s: float, copy_s: float, num_experts: int = 64, overlapped: bool = True,
          gap_s: float = 0.0, slowdown: float = 1.0) -> SplitModel:
    # hidden 2048 in bf16 (4,096 bytes a token), 55 GB/s copies, a flat per-expert CPU time; no host gap and no
    # slowdown unless asked, so the algebra below is the model's alone
    return SplitModel(num_experts, 6, copy_s, 55e9, 4096, ((32, per_expert_s), (512, per_expert_s)), overlapped,
                      gap_s, slowdown)


def box(sampled_s: float, copy_expert_s: float = 0.314e-3) -> SplitModel:
    # the H200 box as profiled (V2-Lite bf16, 2,048 tokens): 0.314 ms to copy an expert (or `copy_expert_s`: a
    # slower link), the CPU side sampled at `sampled_s` an expert, the model's documented gap and slowdown
    return SplitModel(64, 6, 64 * copy_expert_s, 55e9, 4096, ((32, sampled_s), (512, sampled_s)))


def test_the_default_overlaps_and_the_box_does_not_split_for_a_gain_within_its_noise() -> None:
    # 1.79 ms sampled x 1.5 = 2.685 ms a real expert; gap 4.5 + 2 * 2048 * 4096 B / 55 GB/s = 4.805 ms.
    # k = 5: cpu 5 * 2.685 + 4.805 = 18.23 <= copy 59 * 0.314 = 18.53 ms; k = 6: 20.92 > 18.21 (the CPU would
    # set the pace). k = 5 would cost 18.53 ms against 20.10 ms streaming all: 7.8 %, under MIN_GAIN, so no split.
    assert SplitModel.__dataclass_fields__["overlapped"].default is CPU_OVERLAPS_COPY is True
    assert (HOST_GAP_S, CPU_SLOWDOWN, MIN_GAIN) == (4.5e-3, 1.5, 0.10)
    split = box(1.79e-3)
    assert split.cpu_seconds(5, 2048) == pytest.approx(5 * 2.685e-3 + 4.805e-3, abs=1e-5)
    assert split.cpu_seconds(5, 2048) <= split.copy_seconds(59) and split.cpu_seconds(6, 2048) > split.copy_seconds(58)
    assert split.layer_seconds(5, 2048) == pytest.approx(59 * 0.314e-3)
    assert split.plan(2048).cpu_experts == 0
    assert "all 64 experts a layer streamed" in split.describe(2048)


@pytest.mark.parametrize(("sampled_s", "copy_expert_s", "want"),
                         [(1.2e-3, 0.314e-3, 7), (1.5e-3, 0.5e-3, 9), (1.79e-3, 0.7e-3, 11), (2.0e-3, 0.7e-3, 10)])
def test_where_the_split_pays_the_cpu_side_never_outlasts_its_copy(sampled_s: float, copy_expert_s: float,
                                                                  want: int) -> None:
    # a faster CPU side, or a slower link (0.5-0.7 ms an expert: PCIe 4): the chosen k's CPU side (with the gap)
    # fits under the copy of the rest while k + 1's does not, and it saves at least MIN_GAIN
    split = box(sampled_s, copy_expert_s)
    k = split.plan(2048).cpu_experts
    assert k == want
    assert split.cpu_seconds(k, 2048) <= split.copy_seconds(64 - k)
    assert split.cpu_seconds(k + 1, 2048) > split.copy_seconds(64 - k - 1)
    assert split.plan(2048).layer_s == pytest.approx(split.layer_seconds(k, 2048))
    assert split.plan(2048).layer_s <= (1 - MIN_GAIN) * split.plan(2048).stream_s


def test_the_sum_model_streams_everything() -> None:
    # H200 box, 2,048-token prefill, forced k = 0 / 8 / 13 / 16: 0.525 / 0.711 / 0.998 / 1.136 s (26 layers), read
    # as the sides running one after the other; the sum model gives 0.528 / 0.717 s for k = 0 / 8, and so k = 0
    serial = model(1.19e-3, 20.3e-3, overlapped=False, gap_s=0.0)
    assert 26 * serial.layer_seconds(8, 2048) == pytest.approx(0.711, abs=0.01)
    assert serial.plan(2048).cpu_experts == 0
    assert "all 64 experts a layer streamed" in serial.describe(2048)


def test_split_point_is_where_the_cpu_meets_the_copy() -> None:
    # no gap, no slowdown: cpu(k) = 1.19 k + hop, hop = 2 * 2048 * 4096 B / 55 GB/s = 0.305 ms; copy(64 - k) =
    # 0.3172 (64 - k) ms: k = 13 gives max(15.78, 16.18) = 16.18 ms, k = 14 max(16.97, 15.86) (CPU over its copy)
    plan = model(1.19e-3, 20.3e-3).plan(2048)
    assert plan.cpu_experts == 13
    assert plan.layer_s == pytest.approx(20.3e-3 * 51 / 64)
    assert plan.stream_s == pytest.approx(20.3e-3)
    assert "CPU takes 13 of 64 experts a layer at 2,048 tokens (est. 16.2 ms a layer vs 20.3 ms" in \
        model(1.19e-3, 20.3e-3).describe(2048)
    # the gap moves the CPU side up by its length: k = 11 gives 16.795 <= 16.81 ms, k = 12 17.985 > 16.49 ms
    assert model(1.19e-3, 20.3e-3, gap_s=3.4e-3).plan(2048).cpu_experts == 11


def test_no_split_when_the_cpu_is_too_slow_to_pay() -> None:
    # 5 ms an expert against a 10 ms layer copy: k = 1 costs max(5.3, 9.84) = 9.84 ms, a 1.6 % gain < MIN_GAIN
    slow = model(5e-3, 10e-3)
    assert slow.layer_seconds(1, 2048) > (1 - MIN_GAIN) * 10e-3
    assert slow.plan(2048).cpu_experts == 0
    assert "all 64 experts a layer streamed" in slow.describe(2048)
    # the gap alone (3.4 ms) is nearly a 3.5 ms layer copy: k = 1's CPU side, 0.2 + 3.4 + 0.02 ms, is over its copy
    assert model(0.2e-3, 3.5e-3, gap_s=3.4e-3).plan(128).cpu_experts == 0


def test_per_expert_seconds_interpolates_with_a_read_floor() -> None:
    samples = [(32, 1.0), (64, 1.0), (128, 2.0), (256, 4.0)]
    assert per_expert_seconds(samples, 8) == 1.0  # below the smallest sample: reading the weights is the floor
    assert per_expert_seconds(samples, 96) == pytest.approx(1.5)
    assert per_expert_seconds(samples, 512) == pytest.approx(8.0)  # the last slope beyond the samples


def test_split_model_needs_a_measurement() -> None:
    assert SplitModel.from_crossovers(Crossovers(10, 10), 64, 6, 4096) is None
    found = Crossovers(10, 10, copy_s=0.02, copy_bandwidth=55e9, expert_samples=((32, 1e-3),))
    assert SplitModel.from_crossovers(found, 64, 6, 4096) == SplitModel(64, 6, 0.02, 55e9, 4096, ((32, 1e-3),))


def test_cpu_expert_seconds_times_the_engine_pass() -> None:
    gate_up, down, _ = layer(torch.bfloat16, with_lora=False)
    assert 0 < cpu_expert_seconds(16, gate_up, down, repeats=1) < 1.0
    quantized = quantize(gate_up, "int8", projections=2), quantize(down, "int8")
    assert 0 < cpu_expert_seconds(16, *quantized, repeats=1) < 1.0


@pytest.mark.parametrize("inference", [False, True])
def test_worker_thread_runs_the_cpu_side_as_the_caller_would(inference: bool) -> None:
    # grad and inference modes are per thread: the worker takes the caller's, and its rows equal the direct call's
    gate_up, down, _ = layer(torch.bfloat16, with_lora=False)
    module = HostExperts(gate_up, down, torch.nn.SiLU(), ExpertPlacement.from_mode("cpu", cpu_threads=2),
                         "model.layers.0.mlp.experts", compute_device="cpu")
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    index, weights = routing(40)
    with torch.inference_mode(inference):
        tokens, rows = submit_cpu_side(None, (x, index, weights), 3, module, {}).result()
        assert rows.is_inference() == inference
    expect_tokens, expect_rows = cpu_share_rows(x, index, weights, 3, gate_up, down, torch.nn.functional.silu)
    assert torch.equal(tokens, expect_tokens) and torch.equal(rows, expect_rows)
    assert rows.shape == (int((index < 3).sum()), H) and rows.abs().sum() > 0


def test_engine_start_up_line_names_the_split() -> None:
    from kllama.experts.install import ExpertEngine

    gate_up, down, _ = layer(torch.bfloat16, with_lora=False)
    module = HostExperts(gate_up, down, torch.nn.SiLU(), ExpertPlacement.from_mode("auto"),
                         "model.layers.0.mlp.experts", compute_device="cpu")
    engine = ExpertEngine(modules={module.name: module}, streamer=None)
    assert engine.split_note() is None  # nothing measured (no CUDA)
    module.cpu_share = model(1.19e-3, 20.3e-3)
    assert engine.split_note(2048) == model(1.19e-3, 20.3e-3).describe(2048)
    with pytest.warns(UserWarning, match="needs a CUDA compute device"):
        assert module.split_for(2048) == 0  # no CUDA compute device: the pass runs on the CPU, nothing to split


def test_staging_buffers_are_reused_and_change_no_number() -> None:
    # one set of buffers for every layer: the same memory pass after pass (grown once when a pass routes more rows
    # to the CPU), the same rows and tokens as fresh tensors, in and out of inference mode
    gate_up, down, lora = layer(torch.bfloat16, with_lora=True)
    host_lora = {t: expert_factors(f, E, torch.bfloat16) for t, f in lora.items()}
    silu = torch.nn.functional.silu
    staging = HostStaging(pin=False)
    pointers = []
    for seed, tokens, first, inference in ((1, 40, 3, True), (2, 40, 2, False), (3, 64, 5, False), (4, 24, 3, True)):
        x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        index, weights = routing(tokens, seed)
        expect = cpu_share_rows(x, index, weights, first, gate_up, down, silu, host_lora)
        with torch.no_grad(), torch.inference_mode(inference):
            got = cpu_share_rows(x, index, weights, first, gate_up, down, silu, host_lora, staging=staging)
        assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1]) and got[1].abs().sum() > 0
        assert got[1].data_ptr() == staging.take("rows", (1, H), torch.bfloat16).data_ptr()
        assert got[0].data_ptr() == staging.take("tokens", (1,), torch.int64).data_ptr()
        pointers.append((got[0].data_ptr(), got[1].data_ptr(), got[1].shape[0]))
    assert pointers[1][:2] == pointers[0][:2]  # fewer rows: the same buffers
    assert pointers[2][2] > pointers[0][2] and pointers[3][:2] == pointers[2][:2]  # grown once, then kept


def test_worker_writes_the_cpu_side_into_the_staging_buffers() -> None:
    gate_up, down, _ = layer(torch.bfloat16, with_lora=False)
    module = HostExperts(gate_up, down, torch.nn.SiLU(), ExpertPlacement.from_mode("cpu", cpu_threads=2),
                         "model.layers.0.mlp.experts", compute_device="cpu")
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    index, weights = routing(40)
    staging = HostStaging(pin=False)
    for _ in range(2):
        tokens, rows = submit_cpu_side(None, (x, index, weights), 3, module, {}, staging).result()
        assert rows.data_ptr() == staging.take("rows", (1, H), torch.bfloat16).data_ptr()
    expect_tokens, expect_rows = cpu_share_rows(x, index, weights, 3, gate_up, down, torch.nn.functional.silu)
    assert torch.equal(tokens, expect_tokens) and torch.equal(rows, expect_rows)


def test_executor_keeps_one_staging_set_per_thread() -> None:
    executor = SplitExecutor()
    assert executor.staging() is executor.staging()
    assert executor.staging().pin == torch.cuda.is_available()
    assert run_on_worker(executor.staging) is not executor.staging()


def test_start_up_samples_run_in_the_worker_thread() -> None:
    import threading

    assert run_on_worker(lambda: threading.current_thread().name).startswith("kllama-cpu-share")
