"""`decode_compile`: which modules get compiled forwards, that they run compiled only inside `active()` with the same
numbers, that Inductor's expected notes are quiet there, and the config key and decoder switch on a CPU.

The compiled capture itself runs on the GPU: tests/infer/test_compiled_gpu.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from kllama.config import build_config
from kllama.infer.compiled import COMPILED_SUFFIXES, CompiledDecode
from kllama.infer.graphs import GraphedDecoder
from kllama.model.tiny import build_tiny_model


class CountingBackend:
    """A torch.compile backend that runs the traced graph as it is and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def forward_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(7)[None] % model.config.vocab_size
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_attention_norm_and_router_run_compiled_only_inside_active_with_the_same_numbers(arch: str) -> None:
    torch._dynamo.reset()
    model = build_tiny_model(arch, seed=0, dtype=torch.float32).eval()
    want = forward_logits(model)
    backend = CountingBackend()
    compiled = CompiledDecode(model, backend=backend)
    kinds = {type(m).__name__ for m in compiled.modules}
    assert kinds and all(k.lower().endswith(COMPILED_SUFFIXES) for k in kinds)
    assert any(k.endswith("Attention") for k in kinds)
    assert not any("expert" in name for m in compiled.modules for name, _ in m.named_modules())  # no expert pass
    layers = model.config.num_hidden_layers
    assert torch._dynamo.config.cache_size_limit >= 2 * layers + 8  # every layer, one read length
    torch.testing.assert_close(forward_logits(model), want, rtol=0, atol=0)
    assert backend.graphs == 0  # outside active(): the stock forwards, nothing traced
    with compiled.active():
        got = forward_logits(model)
    assert backend.graphs > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    traced = backend.graphs
    torch.testing.assert_close(forward_logits(model), want, rtol=0, atol=0)
    assert backend.graphs == traced


def test_recompile_limits_cover_every_read_length() -> None:
    compiled = CompiledDecode(build_tiny_model("deepseek_v2", seed=0, dtype=torch.float32), backend=CountingBackend())
    compiled.allow(6)  # e.g. read lengths 256 ... 4097
    needed = 6 * (2 * compiled.layers + 8)
    assert torch._dynamo.config.cache_size_limit >= needed
    assert torch._dynamo.config.accumulated_cache_size_limit >= 4 * needed


def test_one_model_shares_one_compiled_decode() -> None:
    model = build_tiny_model("deepseek_v2", seed=0, dtype=torch.float32)
    assert CompiledDecode.of(model) is CompiledDecode.of(model)


def test_only_inductors_expected_notes_are_quiet_inside_active() -> None:
    compiled = CompiledDecode(build_tiny_model("deepseek_v2", seed=0, dtype=torch.float32), backend=CountingBackend())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with compiled.active():
            warnings.warn("Torchinductor does not support code generation for complex operators. Performance may be "
                          "worse than eager.", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]


def test_a_decoder_without_graphs_says_why_it_compiles_nothing() -> None:
    model = build_tiny_model("deepseek_v2", seed=0, dtype=torch.float32)
    decoder = GraphedDecoder(model, 1, 64, compile_steps=True)
    assert decoder.compiled is None and decoder.compile_reason == "steps run eagerly"
    assert GraphedDecoder(model, 1, 64).compile_reason == "not asked for"


def test_decode_compile_is_a_config_key(tmp_path) -> None:
    config = build_config({"model_name_or_path": str(tmp_path), "template": "deepseek", "decode_compile": True},
                          command="chat", check_paths=False)
    assert config.engine.decode_compile is True
    assert build_config({"model_name_or_path": str(tmp_path), "template": "deepseek"}, command="chat",
                        check_paths=False).engine.decode_compile is False


def test_the_engine_says_what_decode_compile_did(moe_model, engine) -> None:  # noqa: ANN001
    from kllama.infer.engine import build_engine

    assert engine.compile_note is None  # not asked for: nothing to say
    config = build_config({"model_name_or_path": str(moe_model), "template": "deepseek", "infer_dtype": "float32",
                           "decode_compile": True}, command="chat")
    asked = build_engine(config, device="cpu")
    assert asked.compile_note == "decode steps not compiled: steps run eagerly"
