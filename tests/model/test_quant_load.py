"""Routed experts quantized at load (int8 / int4 / fp8), fp8 checkpoints in DeepSeek-V3's layout, and exporting them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kllama.cli import main
from kllama.compat import peft_wrapping
from kllama.config.loader import build_config
from kllama.experts.placement import ExpertPlacement
from kllama.experts.quant import QuantizedWeight, dequantize, dequantize_blocks, quantize
from kllama.model.checkpoint import load_expert_layer, scan_checkpoint
from kllama.model.load import load_model
from kllama.model.meta_load import load_checkpoint
from kllama.model.source import read_model_source
from kllama.model.tiny import write_fp8_checkpoint

IDS = torch.randint(0, 2000, (2, 11), generator=torch.Generator().manual_seed(0))
EXPERT = "model.layers.1.mlp.experts.5"


@pytest.fixture(scope="module")
def fp8_model(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny DeepSeek-V3 written in its fp8 layout (float8_e4m3fn weights + 128x128 `weight_scale_inv`)."""
    return write_fp8_checkpoint(tiny_model_dir("deepseek_v3"), tmp_path_factory.mktemp("fp8-v3"))


def _cpu_placements(names: list[str]) -> dict[str, ExpertPlacement]:
    return {n: ExpertPlacement.from_mode("cpu", source="test") for n in names}


def _load(model_dir: Path, expert_dtype: str = "auto", placements=_cpu_placements):  # noqa: ANN001, ANN202
    return load_checkpoint(read_model_source(model_dir, trust_remote_code=False), placements_fn=placements,
                           compute_device="cpu", dtype=torch.float32, show_progress=False, expert_dtype=expert_dtype)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("layout", ["original", "fused"])
def test_quantized_at_load_equals_quantizing_the_loaded_layer(tiny_model_dir, scheme: str, layout: str) -> None:
    # expert by expert into the host buffers, the same bytes as quantizing the whole layer as stored (fp32) at once
    index = scan_checkpoint(tiny_model_dir("qwen3_moe", expert_layout=layout))
    dense = load_expert_layer(index, 1, dtype=torch.float32, pin=True, expert_dtype="bf16")
    held = load_expert_layer(index, 1, dtype=torch.bfloat16, pin=True, expert_dtype=scheme)
    for got, weight, projections in zip(held, dense, (2, 1)):
        want = quantize(weight, scheme, projections=projections, dtype=torch.bfloat16)
        assert isinstance(got, QuantizedWeight) and got.dtype == torch.bfloat16 and got.projections == projections
        assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
        assert torch.equal(got.scale, want.scale)
    assert held[0].data.untyped_storage().data_ptr() == held[1].data.untyped_storage().data_ptr()  # one allocation


def test_scan_pairs_fp8_weights_with_their_block_scales(fp8_model: Path) -> None:
    index = scan_checkpoint(fp8_model)
    layer = index.expert_layers[1]
    assert layer.scaled and layer.dtype == torch.float8_e4m3fn
    assert f"{EXPERT}.gate_proj.weight_scale_inv" in index.expert_keys()
    assert index.scales["model.layers.0.self_attn.o_proj.weight"] == "model.layers.0.self_attn.o_proj.weight_scale_inv"
    assert not any(k.endswith("_scale_inv") for k in index.non_expert_keys())
    assert "model.layers.1.mlp.gate.weight" not in index.scales  # the router stays bf16, as in DeepSeek-V3


def test_fp8_checkpoint_experts_are_kept_as_stored(fp8_model: Path) -> None:
    raw = load_file(str(fp8_model / "model.safetensors"))
    index = scan_checkpoint(fp8_model)
    gate_up, down = load_expert_layer(index, 1, dtype=torch.bfloat16, pin=True)  # auto: fp8 stays fp8
    assert gate_up.scheme == down.scheme == "fp8"
    inter = index.expert_layers[1].intermediate
    for rows, role in ((slice(0, inter), "gate_proj"), (slice(inter, 2 * inter), "up_proj")):
        assert torch.equal(gate_up.data[5, rows].view(torch.uint8), raw[f"{EXPERT}.{role}.weight"].view(torch.uint8))
    assert torch.equal(gate_up.scale[5], torch.cat([raw[f"{EXPERT}.gate_proj.weight_scale_inv"],
                                                    raw[f"{EXPERT}.up_proj.weight_scale_inv"]]))
    assert torch.equal(down.data[5].view(torch.uint8), raw[f"{EXPERT}.down_proj.weight"].view(torch.uint8))
    assert torch.equal(down.scale[5], raw[f"{EXPERT}.down_proj.weight_scale_inv"])
    # bf16 / int8 / int4: dequantized from the blocks, then held as asked
    wanted = dequantize_blocks(raw[f"{EXPERT}.down_proj.weight"], raw[f"{EXPERT}.down_proj.weight_scale_inv"],
                               torch.float32)
    dense = load_expert_layer(index, 1, dtype=torch.float32, pin=True, expert_dtype="bf16")[1]
    assert torch.equal(dense[5], wanted)
    int8 = load_expert_layer(index, 1, dtype=torch.float32, pin=True, expert_dtype="int8")[1]
    assert torch.equal(int8.data[5], quantize(wanted, "int8").data)
    int4 = load_expert_layer(index, 1, dtype=torch.float32, pin=True, expert_dtype="int4")[1]
    want4 = quantize(wanted, "int4")
    assert torch.equal(int4.data[5], want4.data) and torch.equal(int4.scale[5], want4.scale)


def test_fp8_checkpoint_loads_dequantized_outside_the_experts(fp8_model: Path) -> None:
    raw = load_file(str(fp8_model / "model.safetensors"))
    model, engine = _load(fp8_model)
    assert not hasattr(model.config, "quantization_config")  # nothing fp8 is left in the transformers modules
    key = "model.layers.2.self_attn.q_b_proj.weight"
    want = dequantize_blocks(raw[key], raw[key + "_scale_inv"], torch.float32)
    assert torch.equal(model.get_parameter(key), want)
    assert all(m.expert_dtype == "fp8" for m in engine.modules.values())
    stock, none = _load(fp8_model, placements=None)  # stock modules: every weight dequantized (export, hf backend)
    assert none is None and stock.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, stock(IDS).logits, rtol=0, atol=1e-5)


def _v3_adapter(model_dir: Path, out: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_b_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with peft_wrapping():
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    peft_model.save_pretrained(out)
    return out


def test_export_of_an_fp8_base_is_dequantized_and_says_so(tiny_model_dir, fp8_model: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    adapter = _v3_adapter(tiny_model_dir("deepseek_v3"), tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["export", f"model_name_or_path={fp8_model}", f"adapter_name_or_path={adapter}",
                 f"export_dir={out}", "infer_dtype=float32"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "dequantized" in line]
    assert len(lines) == 1 and "fp8" in lines[0]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    written = load_file(str(next(out.glob("*.safetensors"))))
    assert not any(k.endswith("_scale_inv") for k in written)
    assert {v.dtype for v in written.values() if v.is_floating_point()} == {torch.float32}
    base, _ = _load(fp8_model, placements=None)
    with torch.no_grad():
        with peft_wrapping():
            merged = PeftModel.from_pretrained(base, adapter)
        want = merged(IDS).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("expert_dtype", ["int8", "int4"])
def test_export_notes_that_expert_dtype_does_not_apply(moe_model_path: Path, tmp_path: Path, expert_dtype: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from kllama.infer.export import print_dequantized_note

    config = build_config({"model_name_or_path": str(moe_model_path), "export_dir": str(tmp_path / "x"),
                           "use_kt": True, "expert_dtype": expert_dtype}, command="export")
    print_dequantized_note(config, moe_model_path)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"expert_dtype {expert_dtype}" in out


@pytest.fixture
def moe_model_path(tiny_model_dir) -> Path:  # noqa: ANN001
    return tiny_model_dir("deepseek_v2")


@pytest.mark.parametrize("expert_dtype,share", [("int8", 0.55), ("int4", 0.32), ("fp8", 0.55)])
def test_load_model_holds_experts_as_configured(moe_model_path: Path, expert_dtype: str, share: float) -> None:
    # bytes held against bf16: int8 / fp8 1 byte a weight + scales (~0.5), int4 0.5 byte + a scale per 64 (~0.28)
    config = build_config({"model_name_or_path": str(moe_model_path), "template": "deepseek",
                           "infer_backend": "ktransformers", "use_kt": True, "infer_dtype": "bfloat16",
                           "expert_dtype": expert_dtype}, command="chat")
    loaded = load_model(config, "infer", device="cpu")
    modules = list(loaded.engine.modules.values())
    assert {m.expert_dtype for m in modules} == {expert_dtype}
    assert all(isinstance(m.host_weights()[0], QuantizedWeight) for m in modules)
    assert loaded.engine.host_bytes() < share * sum(m.dense_bytes() for m in modules)
    gate_up = modules[0].host_weights()[0]
    assert dequantize(gate_up).dtype == torch.bfloat16


def test_quantized_expert_dtype_needs_the_engine() -> None:
    from kllama.errors import KllamaError

    with pytest.raises(KllamaError, match="expert_dtype: fp8 quantizes the routed experts .* set use_kt: true"):
        build_config({"model_name_or_path": "m", "expert_dtype": "fp8"}, check_paths=False)
    with pytest.raises(KllamaError, match="expert_dtype: 'fp4' is not one of auto, bf16, fp8, int8, int4"):
        build_config({"model_name_or_path": "m", "use_kt": True, "expert_dtype": "fp4"}, check_paths=False)


@pytest.mark.parametrize("scheme,tol", [("int8", 0.03), ("int4", 0.4)])
def test_loaded_quantized_experts_keep_the_logits_close(moe_model_path: Path, scheme: str, tol: float) -> None:
    # the real loader (each expert quantized into the layer's host buffers, int4 packed) and a no-grad forward: the
    # logits move by the experts' quantization error, as a fraction of what removing the routed experts moves them
    # (the bounds of test_quant.py's tiny-model test; measured here 1.1 % for int8, 17.7 % for int4)
    ref_model, _ = _load(moe_model_path, "bf16")
    model, engine = _load(moe_model_path, scheme)
    bare_model, bare_engine = _load(moe_model_path, "bf16")
    assert {m.expert_dtype for m in engine.modules.values()} == {scheme}
    for module in bare_engine.modules.values():
        module.host_weights()[0].zero_()  # act(0) * 0 = 0: the routed experts add nothing
    with torch.no_grad():
        ref, got, bare = (m(IDS).logits for m in (ref_model, model, bare_model))
    assert 0 < (got - ref).norm() / (bare - ref).norm() < tol
