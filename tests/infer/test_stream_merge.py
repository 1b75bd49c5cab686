"""The streamed export writes what the in-memory export writes (tensor names, dtypes, values, side files) for every
family kllama's tiny models cover, keeps the source's shards, and falls back where it cannot apply."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kllama.cli import main
from kllama.compat import peft_wrapped
from kllama.config.loader import build_config
from kllama.infer.adapter_deltas import unsupported_features
from kllama.infer.export import export_in_memory
from kllama.model.adapters import attach_lora, resolve_lora_spec, save_adapter
from kllama.model.tiny import TINY_ARCHS, write_fp8_checkpoint, write_random_adapter, write_tiny_model

IDS = torch.tensor([[6, 300, 41, 999, 77, 1500, 12, 640, 88, 2000, 5, 1234]])
MOE_ARCHS = tuple(a for a in TINY_ARCHS if a not in ("llama", "qwen3"))


def kllama_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """What `kllama train` saves with `lora_target: all`: every linear (dense-MLP and shared-expert linears of MoE
    models through their weights) plus the routed experts, rank 4; lora_B random so every delta is non-zero."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = attach_lora(model, resolve_lora_spec(model, ["all"], rank=4, alpha=8, dropout=0.0), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return save_adapter(peft_model, out)


def export(model_dir: Path, adapters: list[Path], out: Path, dtype: str, *, streamed: bool = True) -> Path:
    args = {"model_name_or_path": str(model_dir), "adapter_name_or_path": ",".join(map(str, adapters)),
            "export_dir": str(out), "infer_dtype": dtype}
    if streamed:
        assert main(["export", *(f"{k}={v}" for k, v in args.items())]) == 0
    else:
        config = build_config({**args, "adapter_name_or_path": [str(a) for a in adapters]}, command="export")
        export_in_memory(config, model_dir, out)
    return out


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same_export(streamed: Path, in_memory: Path, exact: Path | None = None) -> None:
    """Same files; same config, generation config and tokenizer files; same tensor names and dtypes as the
    in-memory export; values within one rounding step of their dtype of `exact` (default: the in-memory export).

    In fp32 both merges compute the same fp32 delta (the matmuls may sum in another order: hence one step). In bf16
    they differ by more: PEFT rounds the LoRA factors of `target_parameters` weights and every delta to bf16 before
    adding, the streamed merge adds in fp32 and rounds once; so a bf16 export is checked against the fp32 in-memory
    merge of the same bf16 source (`exact`), rounded once."""
    side = {p.name for p in streamed.iterdir() if not p.name.endswith((".safetensors", ".index.json"))}
    assert side == {p.name for p in in_memory.iterdir() if not p.name.endswith((".safetensors", ".index.json"))}
    for name in side:
        a, b = (streamed / name).read_text(), (in_memory / name).read_text()
        assert (json.loads(a) == json.loads(b)) if name.endswith(".json") else a == b, name
    got, want, ref = tensors(streamed), tensors(in_memory), tensors(exact or in_memory)
    assert got.keys() == want.keys() == ref.keys()
    for key, value in got.items():
        assert value.dtype == want[key].dtype, key
        if not value.is_floating_point():
            assert torch.equal(value, ref[key]), key
            continue
        a, b = value.double(), ref[key].to(value.dtype).double()
        step = torch.finfo(value.dtype).eps * torch.maximum(a.abs(), b.abs()) + torch.finfo(value.dtype).tiny
        assert bool(((a - b).abs() <= step).all()), (key, (a - b).abs().max())


def logits(model) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Factory: a tiny bf16 model of `arch` (bf16 weights merge in bf16 without a first rounding)."""
    cache: dict[tuple[str, str], Path] = {}

    def make(arch: str, layout: str = "original") -> Path:
        if (arch, layout) not in cache:
            cache[arch, layout] = write_tiny_model(tmp_path_factory.mktemp(f"bf16-{arch}-{layout}"), arch,
                                                   dtype=torch.bfloat16, expert_layout=layout)
        return cache[arch, layout]

    return make


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_streamed_equals_in_memory_and_peft(arch: str, bf16_model, tiny_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    adapter = kllama_adapter(tiny_model_dir(arch), tmp_path / "adapter", seed=1)
    streamed = export(bf16_model(arch), [adapter], tmp_path / "streamed-bf16", "auto")
    exact = export(bf16_model(arch), [adapter], tmp_path / "memory-bf16-fp32", "float32", streamed=False)
    assert_same_export(streamed, export(bf16_model(arch), [adapter], tmp_path / "memory-bf16", "auto",
                                        streamed=False), exact)
    streamed = export(tiny_model_dir(arch), [adapter], tmp_path / "streamed-float32", "float32")
    assert_same_export(streamed, export(tiny_model_dir(arch), [adapter], tmp_path / "memory-fp32", "float32",
                                        streamed=False))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32).eval()
    unadapted = logits(base)
    expected = logits(peft_wrapped(lambda: PeftModel.from_pretrained(base, adapter)))
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "streamed-float32", dtype=torch.float32).eval())
    assert (expected - unadapted).abs().max() > 1e-2  # the adapter really changes the model
    assert (merged - expected).abs().max() < 1e-4


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_peft_adapter_with_rank_2r_gate_up(arch: str, tiny_model_dir, adapter_maker, tmp_path: Path) -> None:  # noqa: ANN001
    # PEFT's own adapter naming gate_proj/up_proj: on families it converts, the fused gate_up LoRA has rank 2r
    source = tiny_model_dir(arch)
    adapter = adapter_maker(source, tmp_path / "adapter", seed=4)
    streamed = export(source, [adapter], tmp_path / "streamed", "float32")
    assert_same_export(streamed, export(source, [adapter], tmp_path / "memory", "float32", streamed=False))


def test_rank_and_alpha_patterns_and_rslora(tiny_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    source = tiny_model_dir("qwen3_moe")
    for name, extra in (("patterns", {"rank_pattern": {"q_proj": 8, ".*\\.down_proj": 2},
                                      "alpha_pattern": {"o_proj": 32, ".*\\.gate_up_proj": 3}}),
                        ("rslora", {"use_rslora": True})):
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], **extra)
        peft_model = peft_wrapped(lambda: get_peft_model(base, config))  # noqa: B023
        with torch.no_grad():
            for key, param in peft_model.named_parameters():
                if "lora_B" in key:
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        peft_model.save_pretrained(tmp_path / name)
        streamed = export(source, [tmp_path / name], tmp_path / f"streamed-{name}", "float32")
        assert_same_export(streamed, export(source, [tmp_path / name], tmp_path / f"memory-{name}", "float32",
                                            streamed=False))
    shapes = load_file(str(tmp_path / "patterns" / "adapter_model.safetensors"))
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 8
    assert shapes["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape[0] == 8 * 2  # down: E * 2


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe", "mixtral"])
def test_fused_source_and_stacked_adapters(arch: str, bf16_model, tiny_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    adapters = [kllama_adapter(tiny_model_dir(arch), tmp_path / f"a{i}", seed=i) for i in (1, 2)]
    source = bf16_model(arch, "fused")
    streamed = export(source, adapters, tmp_path / "streamed", "auto")
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensors(streamed)
    exact = export(source, adapters, tmp_path / "exact", "float32", streamed=False)
    assert_same_export(streamed, export(source, adapters, tmp_path / "memory", "auto", streamed=False), exact)


def test_fp8_source_streams_dequantized(tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    source = write_fp8_checkpoint(tiny_model_dir("deepseek_v3"), tmp_path / "fp8")
    adapter = kllama_adapter(tiny_model_dir("deepseek_v3"), tmp_path / "adapter", seed=1)
    exact = export(source, [adapter], tmp_path / "memory-float32", "float32", streamed=False)
    for dtype in ("auto", "float32"):  # auto: the config's bfloat16
        streamed = export(source, [adapter], tmp_path / f"streamed-{dtype}", dtype)
        out = capsys.readouterr().out
        assert "merging in memory" not in out and sum("dequantized" in line for line in out.splitlines()) == 1
        assert "quantization_config" not in json.loads((streamed / "config.json").read_text())
        written = tensors(streamed)
        assert not any(k.endswith("_scale_inv") for k in written)
        assert torch.float8_e4m3fn not in {v.dtype for v in written.values()}
        assert_same_export(streamed, export(source, [adapter], tmp_path / f"memory-{dtype}", dtype, streamed=False),
                           exact)


def test_sharded_source_keeps_its_shards(tiny_model_dir, moe_adapter: Path, tmp_path: Path) -> None:  # noqa: ANN001
    single = tiny_model_dir("deepseek_v2")
    source = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32).save_pretrained(source, max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(single / name, source / name)
    out = export(source, [moe_adapter], tmp_path / "streamed", "float32")
    src_index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(src_index.values())) > 2
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == src_index
    for shard in set(src_index.values()):
        assert set(load_file(str(out / shard))) == set(load_file(str(source / shard))), shard
    assert_same_export(out, export(source, [moe_adapter], tmp_path / "memory", "float32", streamed=False))


def test_without_adapter_the_export_is_a_copy(bf16_model, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    source = bf16_model("olmoe")
    out = tmp_path / "copy"
    assert main(["export", f"model_name_or_path={source}", f"export_dir={out}"]) == 0
    assert "no adapter_name_or_path given" in caplog.text
    original, written = load_file(str(source / "model.safetensors")), tensors(out)
    assert written.keys() == original.keys() and all(torch.equal(written[k], v) for k, v in original.items())


def test_layers_the_model_does_not_load_are_copied(tiny_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    # like DeepSeek-V3's multi-token-prediction layer 61: experts in the checkpoint beyond num_hidden_layers
    source = tmp_path / "extra-layer"
    shutil.copytree(tiny_model_dir("deepseek_v3"), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    adapter = kllama_adapter(source, tmp_path / "adapter", seed=1)
    out = export(source, [adapter], tmp_path / "streamed", "float32")
    written, original = tensors(out), load_file(str(source / "model.safetensors"))
    assert written.keys() == original.keys()
    extra = [k for k in original if k.startswith("model.layers.2.")]
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in extra
    assert all(torch.equal(written[k], original[k]) for k in extra)
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected = logits(peft_wrapped(lambda: PeftModel.from_pretrained(base, adapter)))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(merged) - expected).abs().max() < 1e-4


def test_unsupported_adapter_falls_back_with_one_line(tiny_model_dir, tmp_path: Path,  # noqa: ANN001
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    source = tiny_model_dir("qwen3_moe")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True)
    write_random_adapter(source, tmp_path / "dora", config)
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected = logits(peft_wrapped(lambda: PeftModel.from_pretrained(base, tmp_path / "dora")))
    out = export(source, [tmp_path / "dora"], tmp_path / "merged", "float32")
    lines = [line for line in capsys.readouterr().out.splitlines() if "merging in memory" in line]
    assert len(lines) == 1 and "use_dora=True" in lines[0]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(merged) - expected).abs().max() < 1e-4


def test_remote_code_model_falls_back_with_one_line(tiny_model_dir, tmp_path: Path,  # noqa: ANN001
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # a model type transformers lacks, built by the directory's own (working) code: no class to map keys with
    source = tmp_path / "custom"
    shutil.copytree(tiny_model_dir("deepseek_v2", expert_layout="fused"), source)
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="kllama_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (source / "config.json").write_text(json.dumps(config))
    (source / "configuration_custom.py").write_text(
        "from transformers import DeepseekV2Config\n\n\nclass CustomConfig(DeepseekV2Config):\n"
        "    model_type = 'kllama_custom'\n")
    (source / "modeling_custom.py").write_text(
        "from transformers import DeepseekV2ForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(DeepseekV2ForCausalLM):\n    config_class = CustomConfig\n")
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=True).eval()
    peft_model = peft_wrapped(lambda: get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = logits(peft_model)
    out = tmp_path / "merged"
    assert main(["export", f"model_name_or_path={source}", f"adapter_name_or_path={tmp_path / 'adapter'}",
                 f"export_dir={out}", "infer_dtype=float32", "trust_remote_code=true"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "merging in memory" in line]
    assert len(lines) == 1 and "kllama_custom" in lines[0] and "own code" in lines[0]
    assert (out / "modeling_custom.py").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    assert (logits(merged) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("field,value", [("use_dora", True), ("bias", "all"), ("modules_to_save", ["lm_head"]),
                                         ("lora_bias", True), ("peft_type", "IA3"), ("init_lora_weights", "pissa"),
                                         ("fan_in_fan_out", True)])
def test_unsupported_features_are_named(field: str, value: object) -> None:
    plain = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "use_dora": False, "modules_to_save": None,
             "init_lora_weights": True, "target_modules": ["q_proj"], "rank_pattern": {}, "use_rslora": True}
    assert unsupported_features(plain) == []
    assert any(found.startswith(f"{field}=") for found in unsupported_features({**plain, field: value}))
