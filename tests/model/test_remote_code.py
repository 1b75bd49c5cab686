"""Remote code: a hub directory's `auto_map` Python never runs for a model type transformers ships, in any command;
it runs only for a type transformers lacks, and only with trust_remote_code: true."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from kllama.cli import main
from kllama.errors import KllamaError
from kllama.model.source import read_model_source

# What DeepSeek-V2-Lite-Chat's config.json names; its modeling file imports a module transformers 5 removed.
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV2Config",
    "AutoModel": "modeling_deepseek.DeepseekV2Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
}
TRAIN = ["stage=dpo", "dataset=dpo_en_demo", "template=deepseek", "cutoff_len=48", "max_samples=4", "max_steps=1",
         "per_device_train_batch_size=2", "lora_rank=4", "disable_tqdm=true", "report_to=none", "save_steps=100"]
NOT_RUN = "the directory's code (auto_map) is not run"


def hub_directory(src: Path, out: Path, marker: Path, model_type: str | None = None) -> Path:
    """A copy of `src` laid out like a hub checkpoint with remote code: `auto_map` in config.json and the two
    Python files beside it, which append to `marker` when imported and then fail like the real ones on
    transformers 5."""
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = AUTO_MAP
    if model_type is not None:
        config["model_type"] = model_type
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        (out / name).write_text(
            f"with open({str(marker)!r}, 'a') as marker:\n    marker.write({name!r} + '\\n')\n"
            "from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask  # gone in v5\n"
        )
    return out


@pytest.fixture
def hub(tiny_model_dir, tmp_path: Path) -> tuple[Path, Path]:  # noqa: ANN001
    marker = tmp_path / "remote-code-ran"
    return hub_directory(tiny_model_dir("deepseek_v2"), tmp_path / "DeepSeek-V2-Lite-Chat", marker), marker


def test_every_command_uses_the_native_class_and_never_the_remote_code(
        hub: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, marker = hub
    common = [f"model_name_or_path={model_dir}", "trust_remote_code=true"]
    # train on the expert engine (meta_load); chat with huggingface and export are stock from_pretrained
    adapter = tmp_path / "adapter"
    assert main(["train", *common, f"output_dir={adapter}", *TRAIN, "use_kt=true", "expert_placement=cpu"]) == 0
    for backend in (["infer_backend=huggingface"], ["infer_backend=ktransformers", "use_kt=true"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
        assert main(["chat", *common, f"adapter_name_or_path={adapter}", "template=deepseek", "max_new_tokens=4",
                     "do_sample=false", *backend]) == 0
        assert "Assistant: " in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["export", *common, f"adapter_name_or_path={adapter}", f"export_dir={merged}"]) == 0
    assert type(AutoModelForCausalLM.from_pretrained(merged)).__module__.startswith("transformers.models.")
    assert not marker.exists(), marker.read_text()
    capsys.readouterr()
    read_model_source(model_dir, trust_remote_code=True)  # said once per directory and process, not per load
    assert NOT_RUN not in capsys.readouterr().err


def test_native_type_ignores_auto_map_without_trust(hub: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, marker = hub
    source = read_model_source(model_dir, trust_remote_code=False)
    assert not source.remote_code and type(source.hf_config).__module__.startswith("transformers.models.deepseek_v2")
    assert capsys.readouterr().err.count(NOT_RUN) == 1
    assert not marker.exists()


def test_remote_code_runs_only_for_unknown_types_with_trust(tiny_model_dir, tmp_path: Path) -> None:  # noqa: ANN001
    marker = tmp_path / "remote-code-ran"
    model_dir = hub_directory(tiny_model_dir("deepseek_v2"), tmp_path / "custom", marker, model_type="kllama_custom")
    with pytest.raises(KllamaError, match=r"'kllama_custom' is not built into transformers.*trust_remote_code: true"):
        read_model_source(model_dir, trust_remote_code=False)
    assert not marker.exists()
    with pytest.raises(KllamaError, match=r"cannot read the config of .*custom"):
        read_model_source(model_dir, trust_remote_code=True)  # the directory's code runs, and fails as on the hub
    assert marker.read_text().splitlines() == ["configuration_deepseek.py"]
    # code that imports but lacks the class auto_map names (how the hub file fails on transformers 5.17): same error
    (model_dir / "configuration_deepseek.py").write_text("VERSION = 1\n")
    with pytest.raises(KllamaError, match=r"cannot read the config of .*custom.*AttributeError"):
        read_model_source(model_dir, trust_remote_code=True)
    config = json.loads((model_dir / "config.json").read_text())
    del config["auto_map"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(KllamaError, match=r"'kllama_custom' is unknown to transformers .* ships no code"):
        read_model_source(model_dir, trust_remote_code=True)


def test_cli_error_for_remote_code_without_trust(tiny_model_dir, tmp_path: Path,  # noqa: ANN001
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "remote-code-ran"
    model_dir = hub_directory(tiny_model_dir("deepseek_v2"), tmp_path / "custom", marker, model_type="kllama_custom")
    assert main(["export", f"model_name_or_path={model_dir}", f"export_dir={tmp_path / 'x'}"]) == 2
    assert "trust_remote_code: true" in capsys.readouterr().err
    assert not marker.exists()  # nothing was imported from the directory
