"""The reference inference YAML (docs/design.md) (infer_backend: ktransformers) with the model/adapter paths overridden:
the expert engine backend answers exactly as stock transformers does with the same adapter (greedy, fp32)."""
from __future__ import annotations

from pathlib import Path

from kllama.config.loader import load_config
from kllama.infer.engine import build_engine
from kllama.infer.sampling import SamplingParams

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "reference_infer.yaml"
MESSAGES = [{"role": "user", "content": "Explain routed experts in one line."}]


def test_reference_yaml_runs_on_the_expert_engine(moe_model: Path, moe_adapter_rank_r: Path) -> None:
    overrides = [f"model_name_or_path={moe_model}", f"adapter_name_or_path={moe_adapter_rank_r}", "infer_dtype=float32"]
    config = load_config(REFERENCE, overrides, command="chat")
    assert config.generation.infer_backend == "ktransformers" and config.data.template == "deepseek"
    kt_engine = build_engine(config, device="cpu")
    hf_config = load_config(REFERENCE, [*overrides, "infer_backend=huggingface", "use_kt=false", "kt_optimize_rule=null"],
                            command="chat")
    hf_engine = build_engine(hf_config, device="cpu")
    params = SamplingParams(max_new_tokens=10, do_sample=False, ignore_eos=True)
    prompt = kt_engine.encode(MESSAGES)
    assert prompt == hf_engine.encode(MESSAGES)
    expected = hf_engine.complete(prompt, params).text
    assert kt_engine.complete(prompt, params).text == expected
    base = load_config(REFERENCE, [f"model_name_or_path={moe_model}", "adapter_name_or_path=null", "infer_dtype=float32"],
                       command="chat")
    assert build_engine(base, device="cpu").complete(prompt, params).text != expected  # the adapter matters
