"""End-to-end `kllama train` runs (real subprocesses) on tiny MoE models, plus the adapter round trip."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
COMMON = ["dataset=dpo_en_demo", "cutoff_len=64", "max_samples=12", "per_device_train_batch_size=2",
          "logging_steps=1", "save_steps=100", "learning_rate=1e-2", "disable_tqdm=true", "report_to=none",
          "lora_rank=4", "seed=7"]


def run_train(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`kllama train ARGS` in a subprocess; fails the test with its output when it fails."""
    out = subprocess.run([sys.executable, "-m", "kllama.cli", "train", *args], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def initial_adapter(model_dir: Path, settings: dict) -> dict[str, torch.Tensor]:
    """The adapter tensors a run starts from (same seed and code path as `kllama train`)."""
    from kllama.config import build_config
    from kllama.model.adapters import adapter_state_dict, attach_lora, resolve_lora_spec
    from kllama.model.load import load_model
    from transformers import set_seed

    config = build_config(dict(settings, model_name_or_path=str(model_dir), output_dir="/nonexistent/x"))
    set_seed(config.training.seed)
    loaded = load_model(config, "train")
    f = config.finetuning
    spec = resolve_lora_spec(loaded.model, f.lora_target, f.lora_rank, f.lora_alpha, f.lora_dropout)
    state = adapter_state_dict(attach_lora(loaded.model, spec, seed=config.training.seed))
    return {name: tensor.cpu() for name, tensor in state.items()}  # compared with the saved (CPU) tensors


def engine_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of base + adapter through kllama's expert engine (the model that was trained)."""
    from kllama.config import build_config
    from kllama.model.adapters import attach_lora, load_adapter_weights, spec_from_adapter
    from kllama.model.load import load_model

    config = build_config({"model_name_or_path": str(model_dir), "use_kt": True, "expert_placement": "cpu"},
                          command="chat")
    loaded = load_model(config, "train")
    model = attach_lora(loaded.model, spec_from_adapter(loaded.model, adapter_dir))
    load_adapter_weights(model, adapter_dir)
    with torch.no_grad():  # inputs go where the run put the model (the GPU when there is one)
        return model(input_ids=ids.to(loaded.device)).logits.cpu()


def stock_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kllama.compat import peft_wrapping

    with peft_wrapping():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = [
    ("deepseek_v2", ["stage=dpo", "pref_loss=sigmoid", "use_kt=true", "expert_placement=cpu"]),
    ("deepseek_v2", ["stage=sft", "dataset=alpaca_en_demo", "use_kt=true"]),
    ("deepseek_v2", ["stage=dpo", "pref_loss=orpo"]),
    ("deepseek_v2", ["stage=dpo", "pref_loss=simpo", "use_kt=true", "pref_beta=2.0"]),
    ("qwen3_moe", ["stage=dpo", "pref_loss=sigmoid", "use_kt=true", "template=qwen"]),
    ("deepseek_v2", ["stage=dpo", "precompute_ref_log_probs=true", "precompute_ref_batch_size=5", "use_kt=true"]),
]


@pytest.mark.parametrize("arch,extra", CASES, ids=[f"{a}-{'-'.join(e[:2])}" for a, e in CASES])
def test_train_changes_every_lora_param_and_adapter_loads_on_stock(arch, extra, tiny_model_dir, tmp_path):
    """The first case runs `kllama train` as a user does (a subprocess); the others run the same `main` in this
    process, which saves each an interpreter start and the imports (~3 s on a 2-core CI machine)."""
    from kllama.cli import main

    model_dir = tiny_model_dir(arch)
    out = tmp_path / "out"
    template = [] if any(e.startswith("template=") for e in extra) else ["template=deepseek"]
    args = [f"model_name_or_path={model_dir}", f"output_dir={out}", "max_steps=2", *COMMON, *template, *extra]
    if (arch, extra) == CASES[0]:
        run_train(*args)
    else:
        assert main(["train", *args]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "all_results.json",
                 "training_args.yaml", "template.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    trained = load_file(str(out / "adapter_model.safetensors"))
    settings = dict(arg.split("=", 1) for arg in args if not arg.startswith(("model_name_or_path", "output_dir")))
    start = initial_adapter(model_dir, settings)
    assert set(start) == set(trained)
    assert any(".experts." in k for k in trained), "routed experts got no LoRA"
    unchanged = [k for k in trained if torch.equal(trained[k], start[k])]
    assert not unchanged, f"LoRA tensors not trained: {unchanged[:5]}"
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    diff = (engine_logits(model_dir, out, ids) - stock_logits(model_dir, out, ids)).abs().max().item()
    assert diff < 1e-4


def test_reference_example_yaml_runs_unchanged_on_tiny(tiny_model_dir, tmp_path, monkeypatch):
    # The reference train YAML (tests/fixtures, docs/design.md) (bf16, llama3 template, KTransformers rule file) with
    # only the model, output dir and step count overridden; `kllama train` in this process, from the repository root
    # as a user runs it (the YAML names its rule file relative to it).
    from kllama.cli import main

    monkeypatch.chdir(REPO)
    yaml = str(REPO / "examples/train_lora/deepseek2_lora_dpo_kt.yaml")
    assert main(["train", yaml, f"model_name_or_path={tiny_model_dir('deepseek_v2')}",
                 f"output_dir={tmp_path / 'out'}", "max_steps=3", "gradient_accumulation_steps=1", "cutoff_len=128",
                 "max_samples=12", "disable_tqdm=true"]) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_bad_dataset_row_is_one_clear_error(tiny_model_dir, tmp_path, capsys):
    """`kllama train` in this process: an uncaught error would raise here instead of returning 2."""
    from kllama.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps(
        {"broken": {"file_name": "broken.json", "ranking": True, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}))
    (data / "broken.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}],
                                                   "chosen": {"from": "gpt", "value": "hello"}}]))
    capsys.readouterr()
    assert main(["train", f"model_name_or_path={tiny_model_dir('deepseek_v2')}", f"output_dir={tmp_path / 'out'}",
                 "stage=dpo", "dataset=broken", f"dataset_dir={data}", "template=deepseek"]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "rejected" in err


def test_dataloader_workers_above_the_usable_cpus_are_clamped_with_one_line():
    """The seed YAML's `dataloader_num_workers: 4` on a 2-core machine: torch would warn, the extra workers only
    compete for the same cores; kllama uses the CPUs it may run on and says so."""
    from kllama.config.kt_keys import usable_cpus
    from kllama.train.run import dataloader_workers

    cpus = usable_cpus()
    assert dataloader_workers(0) == (0, None)
    assert dataloader_workers(cpus) == (cpus, None)
    workers, line = dataloader_workers(cpus + 3)
    assert workers == cpus and line == (f"dataloader_num_workers: {cpus + 3} asked, this process may use {cpus} "
                                        f"CPUs; using {cpus}")
