"""The one loading seam: `load_model(config, purpose)` for train, infer (both backends) and export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

from kllama.config import build_config
from kllama.compat import peft_wrapped
from kllama.errors import KllamaError
from kllama.experts.install import ExpertEngine
from kllama.model.load import LoadedModel, compute_device, load_model

IDS = torch.tensor([[6, 300, 41, 999, 77, 1500, 12, 640]])
ENGINE = {"use_kt": True, "expert_placement": "cpu"}
TRAIN = {"output_dir": "unused", "dataset": "dpo_en_demo"}  # the seam reads neither


def _config(model_dir: Path, command: str = "chat", **settings: object):  # noqa: ANN202 - KllamaConfig
    return build_config({"model_name_or_path": str(model_dir), "template": "deepseek", **settings}, command=command)


def _logits(loaded: LoadedModel) -> torch.Tensor:
    """Logits of IDS, run where the model is and returned on the CPU (runs on different devices compare there)."""
    with torch.no_grad():
        return loaded.model(IDS.to(loaded.device)).logits.cpu()


def _linear_adapter(model_dir: Path, out: Path) -> Path:
    """A PEFT adapter on attention only, with a non-zero B so it changes the logits."""
    from peft import LoraConfig, get_peft_model

    model = peft_wrapped(lambda: get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(out)
    return out


def test_every_purpose_and_backend_gives_the_same_model(tiny_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    model_dir = tiny_model_dir("deepseek_v2")
    adapter = _linear_adapter(model_dir, tmp_path / "adapter")
    with_adapter = {"adapter_name_or_path": str(adapter)}
    runs = {
        "train": load_model(_config(model_dir, "train", **TRAIN), "train"),
        "train use_kt": load_model(_config(model_dir, "train", **TRAIN, **ENGINE), "train"),
        "infer hf": load_model(_config(model_dir, **with_adapter), "infer", device="cpu"),
        "infer kt": load_model(_config(model_dir, infer_backend="ktransformers", **ENGINE, **with_adapter), "infer",
                               device="cpu"),
        "export": load_model(_config(model_dir, "export", export_dir=str(tmp_path / "x"), **with_adapter), "export"),
    }
    # train loads where the purpose says ("auto": the GPU when there is one), infer where it is told, export on its
    # export_device (cpu by default)
    devices = {"train": compute_device(), "train use_kt": compute_device(), "infer hf": torch.device("cpu"),
               "infer kt": torch.device("cpu"), "export": torch.device("cpu")}
    for name, loaded in runs.items():
        assert isinstance(loaded, LoadedModel) and loaded.device == devices[name], (name, loaded.device)
        assert loaded.model.get_input_embeddings().weight.device == loaded.device, name
        assert isinstance(loaded.engine, ExpertEngine) == ("kt" in name), name
        frozen = not any(p.requires_grad for p in loaded.model.parameters())
        assert frozen == (loaded.purpose != "train"), name
        assert loaded.adapters == (() if loaded.purpose == "train" else (adapter,)), name
    # both backends merge the linear layers' LoRA into their weights: no PEFT layer is left to run at each step
    for name in ("infer kt", "infer hf"):
        assert not isinstance(runs[name].model, PeftModel), name
        assert not any(isinstance(m, BaseTunerLayer) for m in runs[name].model.modules()), name
    base = _logits(runs["train"])
    torch.testing.assert_close(_logits(runs["train use_kt"]), base, rtol=0, atol=1e-5)
    adapted = _logits(runs["infer hf"])
    assert (adapted - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(_logits(runs["infer kt"]), adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(runs["export"]), adapted, rtol=0, atol=1e-5)
    assert runs["infer hf"].model_id == f"{model_dir.name}+adapter"


def test_auto_dtype_is_the_checkpoint_dtype_on_both_backends(tmp_path: Path) -> None:
    from kllama.model.tiny import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "bf16", "qwen3_moe", dtype=torch.bfloat16)
    for settings in ({}, {"infer_backend": "ktransformers", **ENGINE}):
        loaded = load_model(_config(model_dir, template="qwen", **settings), "infer", device="cpu")
        assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16, settings


def test_engine_takes_one_adapter_and_errors_come_before_loading(tiny_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    model_dir = tiny_model_dir("deepseek_v2")
    adapter = _linear_adapter(model_dir, tmp_path / "a")
    config = _config(model_dir, infer_backend="ktransformers", adapter_name_or_path=f"{adapter},{adapter}", **ENGINE)
    with pytest.raises(KllamaError, match="ktransformers takes one adapter"):
        load_model(config, "infer")
    with pytest.raises(KllamaError, match="holds no adapter_config.json|has no adapter_config.json"):
        load_model(_config(model_dir, adapter_name_or_path=str(tmp_path)), "infer")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_is_honoured_on_both_backends(tiny_model_dir) -> None:  # noqa: ANN001
    model_dir = tiny_model_dir("deepseek_v2")
    for settings in ({}, {"infer_backend": "ktransformers", **ENGINE}):
        on_cpu = load_model(_config(model_dir, **settings), "infer", device="cpu")
        assert on_cpu.device.type == "cpu" and all(p.device.type == "cpu" for p in on_cpu.model.parameters())
        if on_cpu.engine is not None:
            assert all(m.compute_device.type == "cpu" for m in on_cpu.engine.modules.values())
        on_gpu = load_model(_config(model_dir, **settings), "infer")  # 'auto': the GPU
        assert on_gpu.device.type == "cuda"
        assert all(p.is_cuda for n, p in on_gpu.model.named_parameters() if ".experts." not in n)
        torch.testing.assert_close(_logits(on_gpu), _logits(on_cpu), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", [{}, {"infer_backend": "ktransformers", **ENGINE}], ids=["hf", "kt"])
def test_corrupt_adapter_file_is_one_clear_error(backend: dict, tiny_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    model_dir = tiny_model_dir("deepseek_v2")
    adapter = _linear_adapter(model_dir, tmp_path / "a")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(KllamaError, match=r"adapter_model.safetensors is incomplete or corrupt"):
        load_model(_config(model_dir, adapter_name_or_path=str(adapter), **backend), "infer")


@pytest.mark.parametrize("backend", [{}, ENGINE], ids=["stock", "engine"])
def test_a_config_without_a_pad_id_takes_the_tokenizers_and_the_trainer_leaves_it_quiet(
        backend: dict, tmp_path: Path) -> None:
    """Most MoE checkpoints name no pad id (kllama pads with the tokenizer's, the EOS where it has none). The
    loaded config and generation config carry it, so transformers' Trainer has nothing to rewrite at the start of
    training: before, the full-size user path printed "[transformers] The tokenizer has new PAD/BOS/EOS tokens
    that differ from the model config" in every run."""
    import logging

    from transformers.trainer_utils import align_special_tokens

    from kllama.model.tiny import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "nopad", "deepseek_v2", pad_token_id=None)
    loaded = load_model(_config(model_dir, "train", **TRAIN, **backend), "train")
    pad = loaded.tokenizer.pad_token_id
    assert pad is not None and loaded.model.config.pad_token_id == pad
    assert loaded.model.generation_config.pad_token_id == pad

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        align_special_tokens(loaded.model, loaded.tokenizer)  # what the Trainer runs as training starts
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "special" in r.getMessage() or "PAD/BOS/EOS" in r.getMessage()], records
