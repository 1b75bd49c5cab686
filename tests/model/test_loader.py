"""Checkpoint scanning, expert buffers and the low-memory model loader against stock `from_pretrained`."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kllama.errors import KllamaError
from kllama.experts.placement import ExpertPlacement
from kllama.model.checkpoint import load_expert_layer, scan_checkpoint
from kllama.model.meta_load import load_checkpoint
from kllama.model.source import ModelSource, read_model_source


def _source(model_dir: Path) -> ModelSource:
    return read_model_source(model_dir, trust_remote_code=False)


def _cpu_placements(names: list[str]) -> dict[str, ExpertPlacement]:
    return {n: ExpertPlacement.from_mode("cpu", source="test") for n in names}


def _reference_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("layout", ["original", "fused"])
def test_logits_equal_from_pretrained(tiny_model_dir, arch: str, layout: str) -> None:
    model_dir = tiny_model_dir(arch, expert_layout=layout)
    ids = torch.randint(0, 200, (2, 13), generator=torch.Generator().manual_seed(0))
    want = _reference_logits(model_dir, ids)
    for placements_fn in (None, _cpu_placements):
        model, engine = load_checkpoint(_source(model_dir), placements_fn=placements_fn, compute_device="cpu",
                                   dtype=torch.float32, show_progress=False)
        assert not model.training
        if placements_fn is not None:
            assert set(engine.modules) == set(_cpu_placements(list(engine.modules)))
            assert all(type(m).__name__ == "HostExperts" for m in engine.modules.values())
            inv_freq = next(b for n, b in model.named_buffers() if n.endswith("inv_freq"))
            assert inv_freq.device.type == "cpu" and torch.isfinite(inv_freq).all() and inv_freq.abs().sum() > 0
        with torch.no_grad():
            got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_sharded_checkpoint_and_tied_embeddings(tiny_model_dir, tmp_path: Path) -> None:
    src = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3_moe"), dtype=torch.float32)
    src.config.tie_word_embeddings = True
    src.tie_weights()
    src.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) > 3 and "lm_head.weight" not in shards
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(1))
    want = _reference_logits(tmp_path, ids)
    model, _ = load_checkpoint(_source(tmp_path), placements_fn=_cpu_placements, compute_device="cpu",
                               dtype=torch.float32, show_progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)


def test_scan_records_layout_and_key_naming(tiny_model_dir) -> None:
    mixtral = scan_checkpoint(tiny_model_dir("mixtral"))
    layer = mixtral.expert_layers[1]
    assert (layer.layout, layer.prefix, layer.num_experts, layer.hidden, layer.intermediate) == (
        "per_expert", "model.layers.1.block_sparse_moe.experts", 8, 64, 32)
    assert layer.key("gate", 3) == "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    assert layer.key("up", 3).endswith(".3.w3.weight") and layer.key("down", 3).endswith(".3.w2.weight")
    assert len(mixtral.expert_keys()) == 3 * 8 * 3 and not any(".experts." in k for k in mixtral.non_expert_keys())
    ds = scan_checkpoint(tiny_model_dir("deepseek_v2"))
    assert sorted(ds.expert_layers) == [1, 2]  # layer 0 is dense; shared experts are not routed experts
    assert ds.expert_layers[1].key("gate", 0) == "model.layers.1.mlp.experts.0.gate_proj.weight"
    fused = scan_checkpoint(tiny_model_dir("deepseek_v2", expert_layout="fused")).expert_layers[2]
    assert (fused.layout, fused.key("gate_up"), fused.key("down")) == (
        "fused", "model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj")


@pytest.mark.parametrize("layout", ["original", "fused"])
def test_expert_layer_is_one_buffer_with_gate_then_up(tiny_model_dir, layout: str) -> None:
    model_dir = tiny_model_dir("qwen3_moe", expert_layout=layout)
    gate_up, down = load_expert_layer(scan_checkpoint(model_dir), 1, dtype=torch.bfloat16, pin=True)
    assert gate_up.shape == (8, 64, 64) and down.shape == (8, 64, 32) and gate_up.dtype == torch.bfloat16
    assert gate_up.untyped_storage().data_ptr() == down.untyped_storage().data_ptr()  # one allocation
    raw = load_file(str(tiny_model_dir("qwen3_moe") / "model.safetensors"))
    p = "model.layers.1.mlp.experts.5"
    torch.testing.assert_close(gate_up[5, :32], raw[f"{p}.gate_proj.weight"].bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(gate_up[5, 32:], raw[f"{p}.up_proj.weight"].bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(down[5], raw[f"{p}.down_proj.weight"].bfloat16(), rtol=0, atol=0)


def _copy_without(src: Path, dst: Path, drop: str) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _load(model_dir: Path) -> None:
    load_checkpoint(_source(model_dir), placements_fn=_cpu_placements, compute_device="cpu", dtype=torch.float32,
               show_progress=False)


def test_missing_files_and_keys_are_named(tiny_model_dir, tmp_path: Path) -> None:
    src = tiny_model_dir("mixtral")
    with pytest.raises(KllamaError, match="nowhere.* is not a directory; check the path"):
        _load(tmp_path / "nowhere")
    no_norm = _copy_without(src, tmp_path / "no_norm", "model.norm.weight")
    with pytest.raises(KllamaError, match=r"no tensor for 1 model weight.*model\.norm\.weight"):
        _load(no_norm)
    no_expert = _copy_without(src, tmp_path / "no_expert", "model.layers.2.block_sparse_moe.experts.4.w3.weight")
    with pytest.raises(KllamaError, match=r"model\.layers\.2\.block_sparse_moe\.experts\.4: missing up projection"):
        _load(no_expert)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(KllamaError, match=f"{victim.name}.*missing"):
        _load(sharded)
    dense = tiny_model_dir("llama")
    with pytest.raises(KllamaError, match="does not support model_type 'llama'.*use_kt: false"):
        _load(dense)
    model, engine = load_checkpoint(_source(dense), placements_fn=None, compute_device="cpu", dtype=torch.float32,
                               show_progress=False)  # dense models load stock
    assert engine is None and not any(t.is_meta for t in model.state_dict().values())


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import psutil, torch
    from kllama.experts.module import HostExperts  # noqa: F401  (import cost belongs to the baseline)
    from kllama.experts.placement import ExpertPlacement
    from kllama.model.meta_load import build_meta_model, load_checkpoint
    from kllama.model.source import read_model_source
    model_dir, device = sys.argv[1], sys.argv[2]
    if device == "cuda":
        torch.ones(1, device=device)  # the CUDA context's host memory belongs to the baseline too
    source = read_model_source(model_dir, trust_remote_code=False)
    build_meta_model(source, dtype=torch.float32, attn_implementation=None)  # import model code
    base = psutil.Process().memory_info().rss
    model, engine = load_checkpoint(source, compute_device=device, dtype=torch.float32,
        placements_fn=lambda names: {n: ExpertPlacement.from_mode("cpu") for n in names}, show_progress=False)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across fork+exec.
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    peak = int(status["VmHWM"].split()[0]) * 1024
    pinned = all(m.host_weights()[0].is_pinned() for m in engine.modules.values())
    print(json.dumps({"base": base, "peak": peak, "host": engine.host_bytes(), "pinned": pinned}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux /proc")
@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA device")]),
])
def test_peak_host_memory_stays_near_model_size(tmp_path: Path, device: str) -> None:
    """Load a ~250 MB model in a fresh interpreter; peak RSS growth must stay <= 1.2 x the checkpoint bytes.

    The baseline (interpreter + torch + transformers + the model class, measured in the same subprocess right
    before loading) is subtracted; the peak is the process's high-water RSS (VmHWM), which includes file pages
    mapped while reading, so a loader that kept whole files mapped or made a second copy of any layer would fail.
    On CUDA the expert buffers must be pinned, and pinned exactly: torch's caching host allocator would round each
    50 MB layer up to 64 MB and break the bound.
    """
    from kllama.model.tiny import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "m", "deepseek_v2", seed=0, hidden_size=256, moe_intermediate_size=256,
                                 n_routed_experts=64, num_hidden_layers=6, intermediate_size=512)
    model_bytes = scan_checkpoint(model_dir).total_bytes()
    assert model_bytes > 200e6
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(model_dir), device], capture_output=True,
                         text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    growth = got["peak"] - got["base"]
    assert got["host"] > 0.9 * model_bytes  # the experts really are resident
    assert got["pinned"] == (device == "cuda")
    assert growth <= 1.2 * model_bytes, f"peak grew {growth / 1e6:.0f} MB for {model_bytes / 1e6:.0f} MB ({got})"


def test_bf16_load_keeps_fp32_modules_like_from_pretrained(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("deepseek_v3")  # router's e_score_correction_bias is kept in fp32 by the class
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    model, _ = load_checkpoint(_source(model_dir), placements_fn=None, compute_device="cpu", dtype=torch.bfloat16,
                          show_progress=False)
    want = {k: v.dtype for k, v in ref.state_dict().items()}
    assert {k: v.dtype for k, v in model.state_dict().items()} == want
    assert want["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32
    ids = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_load_pins_experts_and_matches_from_pretrained(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("deepseek_v2")
    ids = torch.randint(0, 200, (2, 13), generator=torch.Generator().manual_seed(0)).cuda()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        want = ref(ids).logits
    modes = {"model.layers.1.mlp.experts": "stream", "model.layers.2.mlp.experts": "cpu"}
    model, engine = load_checkpoint(
        _source(model_dir), compute_device="cuda", dtype=torch.float32, show_progress=False,
        placements_fn=lambda names: {n: ExpertPlacement.from_mode(modes[n], source="test") for n in names})
    assert all(m.host_weights()[0].is_pinned() and m.host_weights()[1].is_pinned() for m in engine.modules.values())
    assert all(p.is_cuda for n, p in model.named_parameters() if ".experts." not in n)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-4)
