"""`gpu_memory_utilization`: which inference runs fill the GPU with resident experts (the filling itself is a GPU
test: test_infer_engine_gpu.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from kllama.config.loader import build_config
from kllama.errors import KllamaError
from kllama.infer.engine import build_engine, fill_fraction


def test_the_fraction_is_vllms_default_and_a_cap_turns_it_off() -> None:
    def fraction(**keys: object) -> float:
        return fill_fraction(build_config({"model_name_or_path": "m", **keys}, command="chat", check_paths=False))

    assert fraction() == 0.9
    assert fraction(gpu_memory_utilization=0.5) == 0.5
    assert fraction(max_gpu_memory="24GB") == 0.0
    assert fraction(gpu_memory_utilization=0) == 0.0


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_fraction_outside_0_1_is_one_clear_error(value: float) -> None:
    with pytest.raises(KllamaError, match=r"gpu_memory_utilization: a fraction of the GPU's memory in \[0, 1\]"):
        build_config({"model_name_or_path": "m", "gpu_memory_utilization": value}, command="chat", check_paths=False)


def test_a_cpu_engine_keeps_its_placements(moe_model: Path) -> None:
    config = build_config({"model_name_or_path": str(moe_model), "template": "deepseek", "infer_dtype": "float32",
                           "infer_backend": "ktransformers", "use_kt": True}, command="chat")
    engine = build_engine(config, device="cpu")
    assert engine.filled_layers == []
    assert {m.placement.mode for m in engine.loaded.engine.modules.values()} == {"cpu"}
