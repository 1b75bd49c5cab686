"""One-layer probes run next to the DPO benchmark: the copy / grouped_mm physics of docs/design.md and kt-kernel's AMX
SFT MoE layer (the CPU-compute anchor of the seed system, KTransformers + LLaMA-Factory)."""
from __future__ import annotations

import time
from typing import Any

import torch

from kllama.experts.quant import QuantizedWeight, dequantize
from kllama.experts.routed import routed_experts_math


def bandwidth_probe(module: Any, top_k: int, tokens: int, device: torch.device) -> dict[str, Any]:
    """One layer: pinned host->GPU copy of its experts (as held: quantized bytes and scales too), their dequantization
    on the GPU when quantized, and grouped_mm forward+backward over `tokens` tokens."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    gate_up, down = module.host_weights()
    nbytes = module.host_bytes()
    dev = [t.empty_like(device) if isinstance(t, QuantizedWeight) else torch.empty_like(t, device=device)
           for t in (gate_up, down)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for d, h in zip(dev, (gate_up, down)):
        d.copy_(h, non_blocking=True)
    reps = 5
    start.record()
    for _ in range(reps):
        for d, h in zip(dev, (gate_up, down)):
            d.copy_(h, non_blocking=True)
    end.record()
    end.synchronize()
    copy_s = start.elapsed_time(end) / 1000 / reps
    dense = [dequantize(d) for d in dev]
    dequant_ms = None
    if isinstance(dev[0], QuantizedWeight):
        start.record()
        for _ in range(reps):
            for d, out in zip(dev, dense):
                dequantize(d, out=out)
        end.record()
        end.synchronize()
        dequant_ms = start.elapsed_time(end) / reps
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, module.hidden_dim, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
    index = torch.rand(tokens, module.num_experts, generator=gen).topk(top_k, dim=-1).indices.to(device)
    w = torch.rand(tokens, top_k, generator=gen).to(device).requires_grad_(True)
    fwd_bwd = []
    for i in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = routed_experts_math(x, index, w, dense[0], dense[1], module.act_fn)
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        if i:
            fwd_bwd.append(time.perf_counter() - t0)
    del dev, dense, x, out
    return {"layer_gb": nbytes / 1e9, "expert_dtype": module.expert_dtype, "copy_ms": copy_s * 1e3,
            "copy_gb_per_s": nbytes / copy_s / 1e9, "dequant_ms": dequant_ms,
            "grouped_mm_fwd_bwd_ms": sum(fwd_bwd) / len(fwd_bwd) * 1e3, "tokens": tokens,
            "expected_ms": {"copy": 20.4, "grouped_mm_fwd_bwd": 13.3, "source": "docs/design.md, V2-Lite, H100 box"}}


_KT_MODULES = ("kt_kernel.sft.amx", "kt_kernel.utils.amx_sft", "kt_kernel.utils.amx", "kt_kernel.experts_sft",
               "kt_kernel")


def kt_kernel_probe(module: Any, top_k: int, tokens: int, threads: int, moe_layers: int, lora_rank: int = 8,
                    ) -> dict[str, Any]:
    """Baseline (b): kt-kernel's AMX BF16 SFT MoE on one layer (forward_sft + backward with LoRA r=8 at `tokens`
    tokens, `threads` CPU threads), extrapolated to all MoE layers. Any failure is recorded, never raised."""
    import importlib

    try:
        importlib.import_module("kt_kernel")
    except Exception as exc:  # noqa: BLE001 - a broken native extension raises anything
        return {"status": "kt_kernel not importable", "error": f"{type(exc).__name__}: {exc}"}
    wrapper_cls, where = None, None
    for name in _KT_MODULES:
        try:
            candidate = getattr(importlib.import_module(name), "AMXSFTMoEWrapper", None)
        except Exception:  # noqa: BLE001
            continue
        if candidate is not None:
            wrapper_cls, where = candidate, name
            break
    if wrapper_cls is None:
        return {"status": "kt_kernel imported but AMXSFTMoEWrapper not found", "searched": list(_KT_MODULES)}
    try:
        import kt_kernel

        num_experts, inter, hidden = module.num_experts, module.intermediate_dim, module.hidden_dim
        wrapper = wrapper_cls(layer_idx=0, num_experts=num_experts, num_experts_per_tok=top_k, hidden_size=hidden,
                              moe_intermediate_size=inter, num_gpu_experts=0, cpuinfer_threads=threads,
                              threadpool_count=1, weight_path=None, chunked_prefill_size=tokens,
                              lora_rank=lora_rank, lora_alpha=2.0 * lora_rank, max_cache_depth=1,
                              method="AMXBF16_SFT")
        gate_up, down = module.host_weights()
        lora = [torch.zeros(num_experts, *shape, dtype=torch.bfloat16) for shape in (
            (lora_rank, hidden), (inter, lora_rank), (lora_rank, hidden), (inter, lora_rank), (lora_rank, inter),
            (hidden, lora_rank))]
        for a in lora[0::2]:
            a.normal_(0.0, 0.01)
        wrapper.init_lora_weights(*lora)
        wrapper.load_weights_from_tensors(gate_up[:, :inter].contiguous(), gate_up[:, inter:].contiguous(),
                                          down.contiguous(), torch.arange(num_experts, dtype=torch.int64))
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
        ids = torch.rand(tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices  # [T, K] int64
        w = torch.rand(tokens, top_k, generator=gen)
        grad = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
        times = []
        for i in range(3):
            t0 = time.perf_counter()
            wrapper.forward_sft(x, ids, w, save_for_backward=True)
            wrapper.backward(grad)
            if i:
                times.append(time.perf_counter() - t0)
        layer_s = sum(times) / len(times)
        return {"status": "ok", "module": where, "version": getattr(kt_kernel, "__version__", None),
                "tokens": tokens, "threads": threads, "layer_fwd_bwd_ms": layer_s * 1e3,
                "tokens_per_s_all_layers": tokens / (layer_s * moe_layers),
                "expected": {"layer_fwd_bwd_ms": 691, "tokens_per_s": 228, "source": "docs/design.md, 4096 tokens"}}
    except Exception as exc:  # noqa: BLE001
        return {"status": "kt_kernel probe failed", "module": where, "error": f"{type(exc).__name__}: {exc}"}
