"""One-sequence decode steps with the non-expert layers fused by torch.compile (`decode_compile: true`).

At batch 1 a decode step's work outside the routed experts is ~35-40 small GPU kernels a layer: the attention's
projections, rotary, casts, concatenations and copies, the norms, the router's softmax and top-k (benchmarks/NOTES.md,
fifteenth session). They take more time launching and ramping up than computing. Inductor fuses the elementwise ones.
On the H200 box (DeepSeek-V2-Lite shape, NOTES, twenty-first session) that made `gpu` placement decode 1.10x as fast
(150.7 -> 166.1 tok/s), and CPU-expert decode spent 1.1-1.3 ms less a token outside the expert kernel.

* **What is compiled**: each module of the transformers model whose class name ends with `Attention`, `RMSNorm`
  or `TopkRouter` (any case), through `torch.compile` (Inductor, static shapes). MoE blocks and experts are not
  compiled, because their passes hand over to the CPU or stream.
* **Recompiles**: dynamo guards the attention on its layer index (the KV cache is indexed by it) and on the mask's
  length. So every layer compiles its own graph, and each read length a step captures (256, 512, 1024, ... cached
  positions, graphs.py) compiles them again. Dynamo's recompile limits are raised to cover every read length of the
  decoder (`allow`); past them dynamo would run the stock code with a warning.
* **When**: only while the decoder warms up and captures a one-sequence step (`CompiledDecode.active()`). Prefill,
  packed steps and steps of larger batch buckets run the stock modules. Steps of more sequences would compile again
  for each batch bucket: dynamic shapes (`dynamic=True`) failed inside Inductor's fake-tensor propagation on torch
  2.11 and 2.13.
* **Cost**: the first capture compiles. On the H200 box that took 27-45 s for V2-Lite, once per process at
  start-up (chat and api capture their first step before they take requests). A capture for a longer read length
  compiles again: 512 positions after 256 took ~0.14 s more than the stock capture there (Inductor reuses the
  kernels it built; longer lengths were not timed at full size).
* **Failure**: if the compiled capture raises, the decoder logs one line, switches compilation off, and captures
  again with the stock modules (`GraphedDecoder`).
* Inductor warns while compiling about things that are expected here. It keeps complex-number rotary (DeepSeek's)
  unfused, and it notes that TF32 matmuls are off. Those two warnings are filtered while the compile runs.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from kllama.infer.kv_cache import transformers_model

COMPILED_SUFFIXES = ("attention", "rmsnorm", "topkrouter")  # class names (lower case) whose forward is compiled
EXPECTED_WARNINGS = (  # Inductor's notes while compiling these modules (module docstring)
    r"Torchinductor does not support code generation for complex operators",
    r"TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled",
)

_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformers model -> its CompiledDecode


class CompiledDecode:
    """Switchable compiled forwards for a model's attention, norm and router modules (module docstring)."""

    def __init__(self, model: nn.Module, backend: str | Callable = "inductor") -> None:
        hf = transformers_model(model)
        self.modules: list[nn.Module] = [m for m in hf.modules()
                                         if type(m).__name__.lower().endswith(COMPILED_SUFFIXES)]
        self._on = False
        self.layers = getattr(hf.config, "num_hidden_layers", 0) or 0
        self.allow(1)
        with warnings.catch_warnings():  # importing Inductor on torch 2.13 notes a deprecation inside torch itself
            warnings.filterwarnings("ignore", message=r"`torch.jit.script_method` is deprecated",
                                    category=DeprecationWarning)
            for module in self.modules:
                self._switch(module, backend)

    @classmethod
    def of(cls, model: nn.Module) -> CompiledDecode:
        """The model's CompiledDecode, made on first use (decoders over one model share its compiled code)."""
        hf = transformers_model(model)
        compiled = _BY_MODEL.get(hf)
        if compiled is None:
            compiled = _BY_MODEL[hf] = cls(hf)
        return compiled

    def _switch(self, module: nn.Module, backend: str | Callable) -> None:
        stock = module.forward
        compiled = torch.compile(stock, backend=backend, dynamic=False)

        def forward(*args: Any, **kwargs: Any) -> Any:
            return (compiled if self._on else stock)(*args, **kwargs)

        module.forward = forward

    def allow(self, read_lengths: int) -> None:
        """Raise dynamo's recompile limits to what `read_lengths` captured read lengths can take: each compiles
        every layer's attention again (its index and its mask's length are guarded)."""
        config = torch._dynamo.config
        needed = read_lengths * (2 * self.layers + 8)
        config.cache_size_limit = max(config.cache_size_limit, needed)
        config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 4 * needed)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the modules run compiled (compiling on first use, with its expected warnings quiet)."""
        self._on = True
        try:
            with warnings.catch_warnings():
                for message in EXPECTED_WARNINGS:
                    warnings.filterwarnings("ignore", message=message)
                yield
        finally:
            self._on = False
