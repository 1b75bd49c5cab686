"""The C++ CPU expert kernel computes what the torch expert math computes, on every instruction-set path this CPU
runs (a machine with AVX512-BF16 checks five tiers, an AVX2 machine two), for bf16, int8, fp8 and int4 weights, and
the engine's no-grad pass uses it."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.nn.functional import silu
from transformers import DynamicCache

from kllama.experts import ExpertPlacement, HostExperts, install_expert_engine
from kllama.experts import cpu_compute, cpu_kernels
from kllama.experts.cpu_compute import cpu_infer_forward, intra_op_threads, kernel_operands
from kllama.experts.cpu_kernels import (
    ISAS,
    KERNEL_DTYPES,
    KERNEL_MAX_TOKENS,
    _int8_rows,
    _why_not_buildable,
    expert_layer,
    is_silu,
    kernel_isas,
    kernel_runs,
    kernel_status,
    reference_layer,
)
from kllama.experts.lora import ExpertLoRA
from kllama.experts.quant import QuantizedWeight, dequantize, quantize, quantize_int4, quantize_int8, unpack_int4
from kllama.infer.kv_cache import cache_argument
from kllama.model.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
needs_kernel = pytest.mark.skipif(_why_not_buildable() is not None, reason="no C++ toolchain to build the kernel")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.dtype == b.dtype == torch.float64:
        return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def layer(dtype: torch.dtype, experts: int, hidden: int, inter: int, rank: int, seed: int = 0) -> tuple:
    """Weights (bf16, int8 + per-row scales, fp8 + 128x128 block scales, gate_up on two grids, or int4 as uint8 +
    per-row 64-column group scales) and bf16 LoRA factors of one random layer."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.1
    down = torch.randn(experts, hidden, inter, generator=gen) * 0.1
    scales: dict = {}
    if dtype in (torch.int8, torch.uint8):
        quantizer = _int8_rows if dtype == torch.int8 else quantize_int4
        (gate_up, scales["gate_up_scale"]), (down, scales["down_scale"]) = quantizer(gate_up), quantizer(down)
    elif dtype == torch.float8_e4m3fn:
        gate_up, down = quantize(gate_up, "fp8", projections=2), quantize(down, "fp8")
        scales = {"gate_up_scale": gate_up.scale, "down_scale": down.scale}
        gate_up, down = gate_up.data, down.data
    else:
        gate_up, down = gate_up.to(dtype), down.to(dtype)
    lora = {
        "gate_up_proj": ((torch.randn(experts, rank, hidden, generator=gen) * 0.1).bfloat16(),
                         (torch.randn(experts, 2 * inter, rank, generator=gen) * 0.1).bfloat16()),
        "down_proj": ((torch.randn(experts, rank, inter, generator=gen) * 0.1).bfloat16(),
                      (torch.randn(experts, hidden, rank, generator=gen) * 0.1).bfloat16())}
    return gate_up, down, scales, lora


def routing(tokens: int, experts: int, top_k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`top_k_index [T, K]` (distinct experts per token) and `top_k_weights [T, K]`."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=-1).indices
    return index, torch.rand(tokens, top_k, generator=gen)


@needs_kernel
def test_kernel_builds_and_runs_the_best_path_of_this_cpu() -> None:
    status = kernel_status()
    assert status.available, status.reason
    best = status.module.best_isa()
    assert ISAS[status.isa] == best  # a path dropped by the load-time check would show here
    assert status.tiers == {dtype: status.isa for dtype in KERNEL_DTYPES}  # for every weight dtype
    assert kernel_isas()[-1] == status.isa and kernel_isas()[0] == "scalar"


@needs_kernel
def test_kernel_threads_are_torchs_intra_op_threads() -> None:
    module = kernel_status().module
    for threads in sorted({1, 2, torch.get_num_threads()}):
        with intra_op_threads(threads):
            assert module.parallel_threads() == threads


def skip_unless_this_cpu_runs(isa: str) -> None:
    if isa not in kernel_isas():
        pytest.skip(f"this CPU does not run the {isa} path")


def kernel_and_reference(isa: str, dtype: torch.dtype, tokens: int, hidden: int, inter: int, with_lora: bool,
                         ) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor]]:
    """The `isa` path's output on a random layer of `dtype` weights (8 experts, top-6 routing, LoRA rank 4 when
    asked), the fp32 reference's, and a callable giving the scalar path's; skips where this CPU lacks `isa`."""
    skip_unless_this_cpu_runs(isa)
    gate_up, down, scales, lora = layer(dtype, 8, hidden, inter, 4)
    index, weights = routing(tokens, 8, 6)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).bfloat16()
    kwargs = {**scales, "lora": lora if with_lora else None}
    got = expert_layer(x, index, weights, gate_up, down, isa=isa, **kwargs)
    assert got.dtype == torch.float32 and got.shape == (tokens, hidden)
    return (got, reference_layer(x, index, weights, gate_up, down, **kwargs),
            lambda: expert_layer(x, index, weights, gate_up, down, isa="scalar", **kwargs))


# shapes with vector tails (83, 45) and without (128, 64); 20 tokens of top-6 over 8 experts put more than 8 rows on
# one expert (the kernel's register block); 301 x 150 spans fp8 scale blocks, the last ones partial (a masked tail in
# a block, and gate_up's two grids of 2 block rows each where one grid of 300 rows would have 3)
@needs_kernel
@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize(("tokens", "hidden", "inter"), [(1, 128, 64), (3, 83, 45), (20, 128, 64), (4, 301, 150)])
@pytest.mark.parametrize("with_lora", [False, True])
def test_kernel_matches_the_fp32_reference(isa: str, dtype: torch.dtype, tokens: int, hidden: int, inter: int,
                                           with_lora: bool) -> None:
    got, expected, scalar = kernel_and_reference(isa, dtype, tokens, hidden, inter, with_lora)
    # bf16 weights: the activation read by down is rounded to bf16 (~2^-9 relative per element); int8, fp8: fp32 all
    # along; every path computes the same products, only the summation order differs
    bound = 5e-3 if dtype == torch.bfloat16 else 1e-5
    assert rel(got, expected) < bound and rel(got, scalar()) < bound


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("with_lora", [False, True])
def test_engine_pass_runs_the_kernel_and_agrees_with_the_torch_path(tokens: int, with_lora: bool) -> None:
    gate_up, down, _, lora = layer(torch.bfloat16, 8, 64, 48, 4)
    index, weights = routing(tokens, 8, 2)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    factors = lora if with_lora else None
    got = cpu_infer_forward(x, index, weights, gate_up, down, silu, factors)
    kernel = expert_layer(x, index, weights, gate_up, down, lora=factors).to(x.dtype)
    torch_path = cpu_infer_forward(x, index, weights, gate_up, down, silu, factors, use_kernel=False)
    assert torch.equal(got, kernel)
    assert rel(got, torch_path) < 1e-2


@needs_kernel
def test_kernel_takes_only_what_it_computes() -> None:
    gate_up, down, _, lora = layer(torch.bfloat16, 4, 32, 16, 2)
    assert kernel_runs(gate_up, down, silu, 1) and kernel_runs(gate_up, down, torch.nn.SiLU(), KERNEL_MAX_TOKENS, lora)
    assert not kernel_runs(gate_up, down, silu, KERNEL_MAX_TOKENS + 1)  # larger passes: torch's GEMMs
    assert not kernel_runs(gate_up, down, torch.nn.GELU(), 1)  # the kernel's activation is SiLU
    assert not kernel_runs(gate_up.float(), down.float(), silu, 1)
    int4 = [quantize_int4(w.float())[0] for w in (gate_up, down)]
    assert kernel_runs(*int4, silu, 1, lora) and not kernel_runs(int4[0], down, silu, 1)
    fp32_lora = {k: (a.float(), b.float()) for k, (a, b) in lora.items()}
    assert not kernel_runs(gate_up, down, silu, 1, fp32_lora)
    assert is_silu(torch.nn.SiLU()) and not is_silu(torch.nn.functional.gelu)
    assert is_silu(torch.nn.SiLU(inplace=True)) and is_silu(silu)  # the in-place probe left the reference intact


@needs_kernel
def test_no_grad_bf16_layer_with_expert_lora_equals_the_training_forward() -> None:
    # HostExperts decoding with an unmerged adapter (kllama chat with adapter_name_or_path) runs the kernel
    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter = 8, 64, 32
    module = HostExperts((torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2).bfloat16(),
                         (torch.randn(experts, hidden, inter, generator=gen) * 0.2).bfloat16(), torch.nn.SiLU(),
                         ExpertPlacement.from_mode("cpu"), "model.layers.1.mlp.experts", compute_device="cpu")
    for target, (n_in, n_out) in {"gate_up_proj": (hidden, 2 * inter), "down_proj": (inter, hidden)}.items():
        lora = ExpertLoRA(experts, n_in, n_out, 4, 8, device=torch.device("cpu"), dtype=torch.float32)
        lora.reset_parameters(gen)
        with torch.no_grad():
            lora.lora_B.normal_(generator=gen)
        module.lora[target] = lora
    x = torch.randn(3, hidden, generator=gen).bfloat16()
    index, weights = routing(3, experts, 2)
    with torch.no_grad():
        no_grad = module(x, index, weights)
    training = module(x.clone().requires_grad_(), index, weights)  # the shared math, saved activations
    assert rel(no_grad, training.detach()) < 1e-2
    with torch.no_grad():
        module.lora_enabled = False
        base = module(x, index, weights)
    assert rel(no_grad - base, training.detach() - base) < 3e-2  # the LoRA part itself is there


def test_without_a_compiler_one_line_says_why_and_the_torch_path_runs(tmp_path: Path) -> None:
    script = (
        "import torch\n"
        "from kllama.experts.cpu_compute import cpu_infer_forward\n"
        "from kllama.experts.cpu_kernels import kernel_status\n"
        "g = torch.Generator().manual_seed(0)\n"
        "gu, dn = torch.randn(4, 16, 8, generator=g).bfloat16(), torch.randn(4, 8, 8, generator=g).bfloat16()\n"
        "x, idx, w = torch.randn(2, 8).bfloat16(), torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2)\n"
        "out = cpu_infer_forward(x, idx, w, gu, dn, torch.nn.functional.silu)\n"
        "ref = cpu_infer_forward(x, idx, w, gu, dn, torch.nn.functional.silu, use_kernel=False)\n"
        "assert torch.equal(out, ref) and not kernel_status().available\n"
        "print('ok', kernel_status().reason)\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path),
           "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok no C++ compiler found")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"kllama: CPU expert kernel unavailable (no C++ compiler found ({tmp_path / 'no-such-compiler'}; "
                     "set CXX or install g++)); CPU expert passes use torch"]


@needs_kernel
def test_engine_pass_runs_int8_experts_in_the_kernel() -> None:
    gen = torch.Generator().manual_seed(4)
    gate_up, down = torch.randn(8, 96, 64, generator=gen) * 0.1, torch.randn(8, 64, 48, generator=gen) * 0.1
    quantized = [QuantizedWeight(*quantize_int8(w), torch.bfloat16) for w in (gate_up, down)]
    index, weights = routing(3, 8, 2)
    x = torch.randn(3, 64, generator=gen).bfloat16()
    got = cpu_infer_forward(x, index, weights, *quantized, silu)
    kernel = expert_layer(x, index, weights, quantized[0].data, quantized[1].data, gate_up_scale=quantized[0].scale,
                          down_scale=quantized[1].scale).to(x.dtype)
    torch_path = cpu_infer_forward(x, index, weights, *quantized, silu, use_kernel=False)  # quant_compute's forms
    assert torch.equal(got, kernel)
    assert rel(got, torch_path) < 1e-2


@needs_kernel
def test_fp8_conversion_of_every_path_equals_torchs_cast_for_every_code() -> None:
    # an e4m3fn byte shifted into fp16 bits is value * 2^-8 for normals and subnormals alike; the NaN codes (0x7f,
    # 0xff) are never produced by quantizing
    codes = torch.arange(256, dtype=torch.uint8)
    finite = (codes & 0x7F) != 0x7F
    expected = codes.view(torch.float8_e4m3fn).float()
    for isa in kernel_isas():
        got = torch.empty(256)
        assert kernel_status().module.fp8_values(codes, got, ISAS[isa]) == ""
        assert torch.equal(got[finite], expected[finite]), isa
        assert torch.equal(got[finite].signbit(), expected[finite].signbit()), isa  # -0 stays -0


@needs_kernel
@pytest.mark.parametrize("isa", list(ISAS))
def test_fp8_kernel_reads_every_code_and_activations_of_any_magnitude(isa: str) -> None:
    # every finite e4m3 code, subnormals and both zeros included, at random places, and tokens whose activations are
    # 2^40, 1 and 2^-40 in size: every path stays as close to the fp32 reference as with quantized random weights
    skip_unless_this_cpu_runs(isa)
    gen = torch.Generator().manual_seed(5)
    experts, hidden, inter = 4, 300, 140

    def codes(*shape: int) -> torch.Tensor:
        picked = torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(torch.uint8)
        nan = (picked & 0x7F) == 0x7F
        return torch.where(nan, picked & 0x80, picked).view(torch.float8_e4m3fn)  # NaN codes become zeros

    gate_up, down = codes(experts, 2 * inter, hidden), codes(experts, hidden, inter)
    assert ((gate_up.view(torch.uint8) & 0x78) == 0).any()  # subnormals and zeros are there
    gate_up_scale = torch.rand(experts, 2 * 2, 3, generator=gen) * 1e-3  # two grids of ceil(140 / 128) = 2 rows
    down_scale = torch.rand(experts, 3, 2, generator=gen) * 1e-3
    x = torch.randn(3, hidden, generator=gen) * torch.tensor([[2.0**40], [1.0], [2.0**-40]])
    index, weights = routing(3, experts, 2)
    kwargs = {"gate_up_scale": gate_up_scale, "down_scale": down_scale}
    got = expert_layer(x, index, weights, gate_up, down, isa=isa, **kwargs)
    expected = reference_layer(x, index, weights, gate_up, down, **kwargs)
    assert torch.isfinite(expected).all()
    for token in range(3):  # in float64: a 2^40 token's squares overflow float32
        assert rel(got[token].double(), expected[token].double()) < 1e-5, (isa, token)


def fp8_pair(gen: torch.Generator, experts: int, hidden: int, inter: int, gate_up_grids: int = 2,
             ) -> list[QuantizedWeight]:
    gate_up, down = (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.1,
                     torch.randn(experts, hidden, inter, generator=gen) * 0.1)
    return [quantize(gate_up, "fp8", projections=gate_up_grids, dtype=torch.bfloat16),
            quantize(down, "fp8", dtype=torch.bfloat16)]


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 6])
def test_engine_pass_runs_fp8_experts_in_the_kernel(tokens: int) -> None:
    gen = torch.Generator().manual_seed(5)
    quantized = fp8_pair(gen, 8, 200, 160)
    index, weights = routing(tokens, 8, 2)
    x = torch.randn(tokens, 200, generator=gen).bfloat16()
    got = cpu_infer_forward(x, index, weights, *quantized, silu)
    kernel = expert_layer(x, index, weights, quantized[0].data, quantized[1].data, gate_up_scale=quantized[0].scale,
                          down_scale=quantized[1].scale).to(x.dtype)
    torch_path = cpu_infer_forward(x, index, weights, *quantized, silu, use_kernel=False)  # dequantized to bf16
    assert torch.equal(got, kernel)
    assert rel(got, torch_path) < 1e-2


@needs_kernel
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_a_prefill_over_quantized_experts_runs_the_kernel_in_64_token_calls(scheme: str) -> None:
    # 150 tokens: three kernel calls (64, 64, 22) give exactly what the calls give one by one, and agree with the
    # torch loop (which dequantizes per expert: 4.9-19 s for a 128-token V2-Lite prefill on the H200 box)
    gen = torch.Generator().manual_seed(6)
    if scheme == "fp8":
        quantized = fp8_pair(gen, 8, 200, 160)
    else:
        weights_ = (torch.randn(8, 320, 200, generator=gen) * 0.1, torch.randn(8, 200, 160, generator=gen) * 0.1)
        quantized = [QuantizedWeight(*quantize_int8(w), torch.bfloat16) for w in weights_]
    index, weights = routing(150, 8, 2)
    x = torch.randn(150, 200, generator=gen).bfloat16()
    got = cpu_infer_forward(x, index, weights, *quantized, silu)
    calls = [expert_layer(x[s], index[s], weights[s], quantized[0].data, quantized[1].data,
                          gate_up_scale=quantized[0].scale, down_scale=quantized[1].scale)
             for s in (slice(0, 64), slice(64, 128), slice(128, 150))]
    assert torch.equal(got, torch.cat(calls).to(x.dtype))
    torch_path = cpu_infer_forward(x, index, weights, *quantized, silu, use_kernel=False)
    assert rel(got, torch_path) < 1e-2


@needs_kernel
def test_fp8_gate_up_on_one_grid_goes_to_the_kernel_only_where_its_blocks_are_the_same() -> None:
    gen = torch.Generator().manual_seed(6)
    index, weights = routing(3, 8, 2)
    for inter, kernel_takes in ((160, False), (128, True)):  # 160: one 320-row grid mixes gate and up rows
        gate_up, down = fp8_pair(gen, 8, 64, inter, gate_up_grids=1)
        assert (kernel_operands(gate_up, down) is not None) == kernel_takes
        x = torch.randn(3, 64, generator=gen).bfloat16()
        got = cpu_infer_forward(x, index, weights, gate_up, down, silu)
        expected = reference_layer(x, index, weights, dequantize(gate_up).float(), dequantize(down).float())
        assert rel(got, expected) < 1e-2
    int8_down = QuantizedWeight(*quantize_int8(dequantize(down)), torch.bfloat16)
    assert kernel_operands(gate_up, int8_down) is None  # mixed schemes: the torch path


@needs_kernel
def test_tiny_model_decodes_fp8_experts_in_the_kernel_as_the_dequantized_bf16_torch_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a prefill and four cached single-token steps of a bf16 model whose routed experts are fp8 on the CPU (expert
    # width 160: gate_up on two block grids with partial blocks)
    model = build_tiny_model("deepseek_v2", seed=0, dtype=torch.bfloat16, moe_intermediate_size=160)
    install_expert_engine(model, lambda name: ExpertPlacement.from_mode("cpu"), "cpu", expert_dtype="fp8")
    ids = torch.randint(0, 2000, (1, 9), generator=torch.Generator().manual_seed(7))

    def decode() -> torch.Tensor:
        cache = {cache_argument(model): DynamicCache(config=model.config)}
        with torch.no_grad():
            logits = [model(ids[:, :5], use_cache=True, **cache).logits[:, -1]]
            for step in range(5, 9):
                logits.append(model(ids[:, step:step + 1], use_cache=True, **cache).logits[:, -1])
        return torch.cat(logits).float()

    calls = []
    real_layer = cpu_compute.expert_layer
    monkeypatch.setattr(cpu_compute, "expert_layer", lambda *a, **k: calls.append(1) or real_layer(*a, **k))
    kernel = decode()
    assert len(calls) == 5 * model.config.num_hidden_layers - 5 * model.config.first_k_dense_replace
    monkeypatch.setattr(cpu_compute, "kernel_runs", lambda *a, **k: False)  # quant_compute: dequantize, bf16 GEMM
    torch_path = decode()
    assert len(calls) == 5 * model.config.num_hidden_layers - 5 * model.config.first_k_dense_replace
    assert rel(kernel, torch_path) < 2e-2


@needs_kernel
def test_a_path_that_disagrees_for_one_weight_dtype_drops_only_that_dtypes_tier(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # the fp8 paths are checked at load like the others; one faulty fp8 path must not cost bf16 / int8 their tier
    best, real_check = kernel_status().isa, cpu_kernels._self_check
    below = kernel_isas()[-2]
    monkeypatch.setattr(cpu_kernels, "_self_check", lambda module, isa, kind: (
        not (isa == best and kind == torch.float8_e4m3fn) and real_check(module, isa, kind)))
    capsys.readouterr()
    status = kernel_status.__wrapped__()  # a fresh load-time check (the cached status stays)
    assert status.isa == best
    assert status.tiers == {torch.bfloat16: best, torch.int8: best, torch.float8_e4m3fn: below, torch.uint8: best}
    assert capsys.readouterr().err.splitlines() == [
        f"kllama: CPU expert kernel: its {best} path disagrees with torch for fp8 weights on this CPU; trying the "
        "next one"]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn, torch.uint8])
def test_a_bf16_out_is_the_fp32_out_rounded_once(dtype: torch.dtype) -> None:
    hidden = 302 if dtype == torch.uint8 else 301  # int4: an even width (151 bytes a row)
    gate_up, down, scales, lora = layer(dtype, 8, hidden, 150, 4)
    index, weights = routing(5, 8, 6)
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(5)).bfloat16()
    fp32 = expert_layer(x, index, weights, gate_up, down, lora=lora, **scales)
    out = torch.full((5, hidden), float("nan"), dtype=torch.bfloat16)
    got = expert_layer(x, index, weights, gate_up, down, lora=lora, out=out, **scales)
    assert got is out
    assert torch.equal(out, fp32.bfloat16())


def host_experts(scheme: str | None, device: torch.device | str, seed: int = 6) -> HostExperts:
    """A HostExperts layer of 8 experts (H=64, I=48) placed on the CPU, its weights bf16, int8 or fp8."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(8, 96, 64, generator=gen) * 0.1).bfloat16()
    down = (torch.randn(8, 64, 48, generator=gen) * 0.1).bfloat16()
    if scheme is not None:
        gate_up, down = quantize(gate_up, scheme, projections=2), quantize(down, scheme)
    return HostExperts(gate_up, down, silu, ExpertPlacement("cpu", "cpu"), "layer", compute_device=device)


@needs_kernel
@pytest.mark.parametrize("scheme", [None, "int8", "fp8"])
def test_a_no_grad_pass_is_one_kernel_call_without_the_autograd_function(
        scheme: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from kllama.experts import module as module_file

    experts = host_experts(scheme, "cpu")
    index, weights = routing(3, 8, 2)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7)).bfloat16()
    expected = cpu_infer_forward(x, index, weights, *experts.host_weights(), silu)
    calls = []
    real_layer = cpu_compute.expert_layer
    monkeypatch.setattr(cpu_compute, "expert_layer", lambda *a, **k: calls.append(1) or real_layer(*a, **k))
    monkeypatch.setattr(module_file._ExpertsFunction, "apply", None)  # any use of it fails
    with torch.no_grad():
        got = experts(x, index, weights)
    assert torch.equal(got, expected) and got.dtype == x.dtype
    assert experts(x, index, weights).grad_fn is None  # grad mode on, nothing asks for a gradient: same pass
    assert len(calls) == 2


@pytest.mark.gpu
@needs_kernel
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", [None, "int8"])
def test_decode_passes_from_the_gpu_reuse_their_pinned_buffers_and_equal_the_host_pass(scheme: str | None) -> None:
    device = torch.device("cuda")
    experts = host_experts(scheme, device)
    gen = torch.Generator().manual_seed(8)
    for step, tokens in enumerate([1, 3, 1, 1, 3]):  # two shapes, each staged once and reused
        index, weights = routing(tokens, 8, 2, seed=step)
        x = torch.randn(tokens, 64, generator=gen).bfloat16()
        with torch.no_grad():
            got = experts(x.to(device), index.to(device), weights.to(device).bfloat16())
        expected = cpu_infer_forward(x, index, weights.bfloat16().float(), *experts.host_weights(), silu)
        assert got.device.type == "cuda" and got.dtype == torch.bfloat16
        assert torch.equal(got.cpu(), expected)
    assert len(cpu_compute._STAGING[experts]) == 2


# int8 and int4 on the avx512-vnni tier and above read activations as 24-bit integers times one scale per row: an
# outlier (massive activations are common in LLM hidden states) coarsens every other element's step, within the
# bound that csrc/expert_pass.cpp documents (~2.4e-7 x max|a| x sum|w| a dot product), far below int8's own rounding
@needs_kernel
@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("outlier", [1e2, 1e4])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_int8_and_int4_with_an_outlier_activation_stay_at_fp32_accuracy(isa: str, outlier: float,
                                                                         dtype: torch.dtype) -> None:
    # int4 on those tiers: the same 24-bit digits, split into even and odd columns (csrc/expert_pass.cpp)
    skip_unless_this_cpu_runs(isa)
    gate_up, down, scales, lora = layer(dtype, 8, 2048, 150, 4)
    index, weights = routing(4, 8, 6)
    x = torch.randn(4, 2048, generator=torch.Generator().manual_seed(9))
    x[:, 7] = outlier
    got = expert_layer(x, index, weights, gate_up, down, isa=isa, lora=lora, **scales)
    expected = reference_layer(x, index, weights, gate_up, down, lora=lora, **scales)
    assert rel(got, expected) < 1e-5


# int4: widths 32, 64 and 96 (a half group, one group, a group and a half), 46 and 150 (a last group of 23 and 11
# bytes: an odd byte count in a 16-byte step), 200 (three groups and 4 bytes); 64 tokens: 8-pair register blocks
@needs_kernel
@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize(("hidden", "inter"), [(64, 32), (96, 46), (32, 96), (200, 150)])
@pytest.mark.parametrize("with_lora", [False, True])
def test_int4_matches_the_fp32_reference_of_its_dequantized_weights(isa: str, tokens: int, hidden: int, inter: int,
                                                                    with_lora: bool) -> None:
    got, expected, scalar = kernel_and_reference(isa, torch.uint8, tokens, hidden, inter, with_lora)
    assert rel(got, expected) < 1e-5
    assert rel(got, scalar()) < 1e-5


def test_int4_self_check_quantizer_packs_even_columns_in_the_low_nibble() -> None:
    # a row of 66 columns: one group of 64 with amax 7 (scale 1), and a last group of 2 (amax 3.5, scale 0.5)
    row = torch.zeros(1, 66)
    row[0, 0], row[0, 1], row[0, 63], row[0, 64], row[0, 65] = 7.0, -3.0, 1.4, -3.5, 1.0
    packed, scale = quantize_int4(row)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 33) and scale.shape == (1, 2)
    assert scale.tolist() == [[1.0, 0.5]]
    assert packed[0, 0].item() == (8 + 7) | (8 - 3) << 4  # column 0 low, column 1 high
    assert packed[0, 31].item() == 8 | (8 + 1) << 4  # columns 62 (0) and 63 (1.4 -> 1)
    assert packed[0, 32].item() == (8 - 7) | (8 + 2) << 4  # -3.5 / 0.5 = -7; 1.0 / 0.5 = 2
    assert packed[0, 1:31].eq(0x88).all()  # zeros are nibble 8
    assert quantize_int4(torch.zeros(2, 64))[1].eq(1).all()  # an all-zero group: scale 1
    assert torch.equal(unpack_int4(packed).float()[0, :2], torch.tensor([7.0, -3.0]))


@needs_kernel
@pytest.mark.parametrize("isa", list(ISAS))
def test_int4_nibble_order_by_hand(isa: str) -> None:
    # H = I = 2: one byte a row. Rows (gate 0, gate 1, up 0, up 1) = ([3, -1], [0, 1], [1, 0], [1, 1]) with scales
    # (0.5, 1, 1, 2), down rows ([1, -2], [0, 4]) with scales (1, 0.25); x = [1, 2], one expert, routing weight 1:
    # gate = (0.5 * (3 - 2), 2) = (0.5, 2), up = (1, 2 * 3) = (1, 6), act = (silu(0.5), 6 silu(2)),
    # out = (act0 - 2 act1, 0.25 * 4 act1). With the nibbles swapped gate would be (0.5 * 5, 1): another result.
    skip_unless_this_cpu_runs(isa)

    def byte(even: int, odd: int) -> int:
        return (even + 8) | (odd + 8) << 4

    gate_up = torch.tensor([[[byte(3, -1)], [byte(0, 1)], [byte(1, 0)], [byte(1, 1)]]], dtype=torch.uint8)
    down = torch.tensor([[[byte(1, -2)], [byte(0, 4)]]], dtype=torch.uint8)
    scales = {"gate_up_scale": torch.tensor([[[0.5], [1.0], [1.0], [2.0]]]),
              "down_scale": torch.tensor([[[1.0], [0.25]]])}
    x = torch.tensor([[1.0, 2.0]])
    got = expert_layer(x, torch.tensor([[0]]), torch.tensor([[1.0]]), gate_up, down, isa=isa, **scales)
    act = torch.tensor([silu(torch.tensor(0.5)).item(), 6 * silu(torch.tensor(2.0)).item()])
    expected = torch.tensor([[act[0] - 2 * act[1], act[1]]])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_int4_weights_reject_an_odd_intermediate_size_and_wrong_scales() -> None:
    gate_up, down, scales, _ = layer(torch.uint8, 2, 64, 32, 2)
    x, index, weights = torch.randn(1, 64), torch.tensor([[0]]), torch.tensor([[1.0]])
    with pytest.raises(RuntimeError, match=r"gate_up_scale has shape .* \(64-column groups\)"):
        expert_layer(x, index, weights, gate_up, down, gate_up_scale=scales["gate_up_scale"][..., :0],
                     down_scale=scales["down_scale"])
    with pytest.raises(RuntimeError, match="even intermediate size"):
        expert_layer(x, index, weights, gate_up[:, :62], down, **scales)


@needs_kernel
@pytest.mark.parametrize("isa", list(ISAS))
def test_int4_reads_every_nibble_value_as_the_reference_does(isa: str) -> None:
    # random bytes: all 16 nibble values, including 0 (never quantized to; read as -8), on both projections
    skip_unless_this_cpu_runs(isa)
    gen = torch.Generator().manual_seed(11)
    experts, hidden, inter = 4, 160, 96
    gate_up = torch.randint(0, 256, (experts, 2 * inter, hidden // 2), generator=gen, dtype=torch.uint8)
    down = torch.randint(0, 256, (experts, hidden, inter // 2), generator=gen, dtype=torch.uint8)
    assert set(torch.cat([(gate_up & 15).flatten(), (gate_up >> 4).flatten()]).tolist()) == set(range(16))
    scales = {"gate_up_scale": torch.rand(experts, 2 * inter, 3, generator=gen) * 0.01,
              "down_scale": torch.rand(experts, hidden, 2, generator=gen) * 0.01}
    index, weights = routing(5, experts, 2)
    x = torch.randn(5, hidden, generator=gen)
    got = expert_layer(x, index, weights, gate_up, down, isa=isa, **scales)
    assert rel(got, reference_layer(x, index, weights, gate_up, down, **scales)) < 1e-5


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_a_host_job_reruns_its_buffers_contents_row_count_and_lora_as_expert_layer_computes_them(
        dtype: torch.dtype) -> None:
    import ctypes

    gate_up, down, scales, lora = layer(dtype, 8, 128, 64, rank=4)
    x, index, weights = torch.zeros(5, 128, dtype=torch.bfloat16), torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, 2)
    out = torch.full((5, 128), 7.0, dtype=torch.bfloat16)
    job = cpu_kernels.host_job(x, index, weights, gate_up, down, out=out, threads=2, lora=lora, **scales)
    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(kernel_status().module.host_job_callback())
    assert (job.rows, job.threads, job.runs, job.error) == (5, 2, 0, "")
    for seed, rows in [(1, 5), (2, 3), (3, 0)]:  # new contents each run, as a replay's copies write them
        gen = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(5, 128, generator=gen).bfloat16())
        index.copy_(routing(5, 8, 2, seed)[0])
        weights.copy_(torch.rand(5, 2, generator=gen))
        before = out.clone()
        job.rows = rows
        if seed == 2:
            callback(job.address)  # the C entry point a CUDA host node calls, on this thread
        else:
            job.run()
        expected = expert_layer(x[:rows], index[:rows], weights[:rows], gate_up, down, lora=lora, **scales)
        assert torch.equal(out[:rows], expected.bfloat16())
        assert torch.equal(out[rows:], before[rows:])  # rows past the count keep what they held
    assert job.runs == 3 and job.error == ""


@needs_kernel
def test_a_host_job_keeps_a_runs_error_instead_of_raising_and_checks_its_arguments_when_made() -> None:
    gate_up, down, scales, _ = layer(torch.int8, 8, 128, 64, rank=4)
    x, weights, out = torch.randn(2, 128).bfloat16(), torch.rand(2, 2), torch.zeros(2, 128, dtype=torch.bfloat16)
    index = torch.tensor([[0, 1], [2, 9]])  # expert 9 of 8
    job = cpu_kernels.host_job(x, index, weights, gate_up, down, out=out, threads=1, **scales)
    job.run()
    assert "expert 9" in job.error and job.runs == 0
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(RuntimeError, match="top_k_weights"):
        cpu_kernels.host_job(x, index, weights.double(), gate_up, down, out=out, threads=1, **scales)
    job = cpu_kernels.host_job(x, index.clamp(max=7), weights, gate_up, down, out=out, threads=1, **scales)
    job.rows, job.threads = 3, 0
    assert (job.rows, job.threads) == (2, 1)  # clamped: nothing is raised from the extension (KL_CHECK)
    with pytest.raises(RuntimeError, match="a host job needs at least one thread"):
        cpu_kernels.host_job(x, index, weights, gate_up, down, out=out, threads=0, **scales)


@needs_kernel
def test_an_expert_id_out_of_range_is_one_clear_error_of_the_kernel_call() -> None:
    gate_up, down, scales, _ = layer(torch.int8, 8, 128, 64, rank=4)
    with pytest.raises(RuntimeError, match=r"top_k_index holds expert 9, outside \[0, 8\)"):
        expert_layer(torch.randn(2, 128), torch.tensor([[0, 1], [2, 9]]), torch.rand(2, 2), gate_up, down, **scales)


@needs_kernel
def test_a_host_job_run_on_this_thread_leaves_torchs_thread_count_as_it_was() -> None:
    gate_up, down, scales, _ = layer(torch.int8, 8, 128, 64, rank=4)
    x, index, weights = torch.randn(1, 128).bfloat16(), torch.tensor([[0, 3]]), torch.rand(1, 2)
    before = torch.get_num_threads()
    job = cpu_kernels.host_job(x, index, weights, gate_up, down, out=torch.zeros(1, 128, dtype=torch.bfloat16),
                               threads=before + 1, **scales)
    job.run()
    assert job.runs == 1 and torch.get_num_threads() == before


def _wait_for(flags: torch.Tensor, word: int, value: int, seconds: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while int(flags[word]) != value:
        assert time.monotonic() < deadline, f"flag word {word} never became {value}: {flags.tolist()}"
        time.sleep(1e-4)


@needs_kernel
def test_the_handoff_runner_answers_each_go_flag_in_order_with_its_jobs_pass() -> None:
    # what a captured step's stream memory operations do, played from this thread: go = 1, wait for done = 1, done = 0
    layers = [layer(torch.int8, 8, 128, 64, rank=4, seed=s) for s in (0, 1)] + [layer(torch.bfloat16, 8, 128, 64, 4)]
    runner = cpu_kernels.handoff_runner()
    jobs, flags, buffers = [], [], []
    for number, (gate_up, down, scales, lora) in enumerate(layers):
        gen = torch.Generator().manual_seed(number)
        x, (index, weights) = torch.randn(2, 128, generator=gen).bfloat16(), routing(2, 8, 2, seed=number)
        out = torch.zeros(2, 128, dtype=torch.bfloat16)
        jobs.append(cpu_kernels.host_job(x, index, weights, gate_up, down, out=out, threads=2, lora=lora, **scales))
        flags.append(torch.zeros(2, dtype=torch.int32))
        buffers.append((x, index, weights, out, expert_layer(x, index, weights, gate_up, down, lora=lora, **scales)))
    sequence = cpu_kernels.handoff_sequence(jobs, flags)
    assert sequence.size == 3
    served = runner.served
    for replay in range(2):
        runner.arm(sequence)
        for number, flag in enumerate(flags):
            assert all(job.runs == replay + (i < number) for i, job in enumerate(jobs))  # nothing runs before its go
            flag[0] = 1
            _wait_for(flag, 1, 1)
            assert int(flag[0]) == 0  # the runner cleared go before it answered
            flag[1] = 0
            x, index, weights, out, expected = buffers[number]
            assert torch.equal(out, expected.bfloat16())
    assert runner.served == served + 6 and all(job.runs == 2 and job.error == "" for job in jobs)


@needs_kernel
def test_the_handoff_runner_stamps_its_passes_once_asked() -> None:
    # decode.py --timeline: (go seen, done written) a pass, in order, only after the first timeline() call
    gate_up, down, scales, _ = layer(torch.int8, 8, 128, 64, rank=0)
    x, (index, weights) = torch.randn(1, 128).bfloat16(), routing(1, 8, 2)
    jobs = [cpu_kernels.host_job(x, index, weights, gate_up, down, out=torch.zeros(1, 128), threads=1, **scales)
            for _ in range(2)]
    flags = [torch.zeros(2, dtype=torch.int32) for _ in jobs]
    sequence = cpu_kernels.handoff_sequence(jobs, flags)
    runner = cpu_kernels.handoff_runner()
    runner.timeline()  # drops what other tests' passes left, and starts the stamping
    runner.arm(sequence)
    for flag in flags:
        flag[0] = 1
        _wait_for(flag, 1, 1)
        flag[1] = 0
    stamps = runner.timeline()
    assert len(stamps) == 2 and all(go <= done for go, done in stamps), stamps
    assert stamps[0][1] <= stamps[1][0]  # the second pass's go came after the first one's done
    assert runner.timeline() == []  # each call hands over what came since the last one


@needs_kernel
def test_a_cancelled_handoff_frees_the_runner_and_a_failed_pass_still_answers() -> None:
    gate_up, down, scales, _ = layer(torch.int8, 8, 128, 64, rank=4)
    out = torch.zeros(1, 128, dtype=torch.bfloat16)
    bad = cpu_kernels.host_job(torch.randn(1, 128).bfloat16(), torch.tensor([[0, 9]]), torch.rand(1, 2), gate_up,
                               down, out=out, threads=1, **scales)
    flags = torch.zeros(2, dtype=torch.int32)
    sequence = cpu_kernels.handoff_sequence([bad], [flags])
    runner = cpu_kernels.handoff_runner()
    runner.arm(sequence)
    runner.cancel()  # a replay that never launched: its go never comes
    runner.arm(sequence)  # the next replay is served, so the runner is not still waiting on the cancelled one
    flags[0] = 1
    _wait_for(flags, 1, 1)
    assert "expert 9" in bad.error and torch.equal(out, torch.zeros_like(out))  # the error is kept, done is written
    with pytest.raises(RuntimeError, match="one flag pair per job"):
        cpu_kernels.handoff_sequence([bad], [])
    with pytest.raises(RuntimeError, match="int32 host tensor of 2 words"):
        cpu_kernels.handoff_sequence([bad], [torch.zeros(3, dtype=torch.int32)])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("tokens", [1, 12])
def test_a_pass_gives_the_same_bits_on_any_number_of_threads(dtype: torch.dtype, tokens: int) -> None:
    # one token (the paired gate/up path) and 12 tokens over 4 experts (the several-row path): threads own output
    # rows and sum a token's experts in expert order, so no sum depends on how the rows were split
    gate_up, down, scales, _ = layer(dtype, 4, 160, 96, 4, seed=7)
    index, weights = routing(tokens, 4, 2, seed=8)
    x = torch.randn(tokens, 160, generator=torch.Generator().manual_seed(9)).bfloat16()
    outs = []
    for threads in (1, 2, 3):
        with intra_op_threads(threads):
            outs.append(expert_layer(x, index, weights, gate_up, down, **scales))
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


@needs_kernel
def test_an_int8_token_alone_equals_its_row_among_many_tokens_an_expert() -> None:
    # VNNI sums int8 rows exactly, so the decode path (one token, paired gate/up) and the several-row one agree to
    # the bit
    gate_up, down, scales, _ = layer(torch.int8, 4, 160, 96, 4, seed=10)
    index, weights = routing(12, 4, 2, seed=11)
    x = torch.randn(12, 160, generator=torch.Generator().manual_seed(12)).bfloat16()
    many = expert_layer(x, index, weights, gate_up, down, **scales)
    alone = torch.cat([expert_layer(x[t:t + 1], index[t:t + 1], weights[t:t + 1], gate_up, down, **scales)
                       for t in range(12)])
    if kernel_status().tiers.get(torch.int8) not in ("avx512-vnni", "avx512-bf16"):
        assert rel(many, alone) < 1e-5  # the fp32 paths keep more chains with fewer rows: other rounding
    else:
        assert torch.equal(many, alone)
