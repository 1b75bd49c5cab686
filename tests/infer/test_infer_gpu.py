"""GPU runs of the generation engine: both backends on CUDA agree with each other (fp32, greedy).

Run on the GPU box with: `.venv/bin/pytest -q -m gpu tests/infer/test_infer_gpu.py`
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kllama.config.loader import build_config
from kllama.infer.engine import build_engine
from kllama.infer.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_backends_agree_on_gpu(moe_model: Path, moe_adapter_rank_r: Path) -> None:
    common = {"model_name_or_path": str(moe_model), "adapter_name_or_path": str(moe_adapter_rank_r),
              "template": "deepseek", "infer_dtype": "float32"}
    hf = build_engine(build_config(common, command="chat"), device="cuda")
    kt = build_engine(build_config({**common, "infer_backend": "ktransformers", "use_kt": True}, command="chat"),
                      device="cuda")
    assert hf.loaded.device.type == "cuda" and kt.loaded.device.type == "cuda"
    prompt = hf.encode([{"role": "user", "content": "Say something about GPUs."}])
    params = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)
    expected = hf.complete(prompt, params)
    assert expected.completion_tokens == 16
    assert kt.complete(prompt, params).text == expected.text
    assert "".join(c.text for c in kt.stream(prompt, params)) == expected.text
