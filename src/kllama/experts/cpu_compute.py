"""The routed-experts math (device-agnostic) and the executor that runs it on the CPU next to the host weights.

`routed_experts_math` is the one definition of what a routed-experts layer computes; every target (cpu, stream, gpu)
calls it, so they agree by construction with each other and with transformers' `grouped_mm` / eager experts:
tokens are grouped by expert, `gate_up` is split `[gate; up]`, `act(gate) * up` goes through `down`, each row is
scaled by its routing weight, and the top-k rows of a token are summed. Expert LoRA adds
`scaling * (x @ A_e^T) @ B_e^T` to each projection, with A/B in PEFT's `ParamWrapper` layout (see lora.py).

Executors save only the inputs (hidden states + routing) in forward and recompute the layer in backward, so a pass
keeps no `[tokens*top_k, 2I]` activations alive between forward and backward.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class LoraFactors(NamedTuple):
    """One projection's expert LoRA in PEFT's layout: `A [E*r, in]`, `B [out, E*r]`, delta = scaling * B_e @ A_e."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float


def _can_group(x: Tensor, weight: Tensor) -> bool:
    # torch's grouped GEMM (CUDA, SM80+) wants bf16 operands whose inner dims are 16-byte multiples
    # (the same conditions transformers.integrations.moe._can_use_grouped_mm checks for the stock path).
    if _GROUPED_MM is None or not x.is_cuda or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if weight.shape[-1] % 8 or weight.shape[-2] % 8:
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, counts: Sequence[int]) -> Tensor:
    """`x [S, in]` (rows sorted by expert) times each expert's `weight [E, out, in]`^T -> `[S, out]`.

    Uses torch's grouped GEMM where it applies (CUDA bf16, aligned), else one matmul per expert with tokens.
    `offsets` are the cumulative row counts (int32, on x's device); `counts` the same per expert on the host.
    """
    if _can_group(x, weight):
        return _GROUPED_MM(x, weight.transpose(-2, -1), offs=offsets)
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            pieces.append(x[start : start + count] @ weight[expert].T)  # [n, out]
            start += count
    if not pieces:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(pieces)


def _lora_delta(x: Tensor, lora: LoraFactors, offsets: Tensor, counts: Sequence[int], dtype: torch.dtype) -> Tensor:
    num_experts = len(counts)
    out_features = lora.lora_B.shape[0]
    a = lora.lora_A.to(dtype).view(num_experts, -1, lora.lora_A.shape[-1])  # [E, r, in]: rows e*r:(e+1)*r
    # PEFT reads lora_B as [out, r, E]: expert e owns columns e, e+E, e+2E, ...
    b = lora.lora_B.to(dtype).view(out_features, -1, num_experts).permute(2, 0, 1).contiguous()  # [E, out, r]
    return grouped_linear(grouped_linear(x, a, offsets, counts), b, offsets, counts) * lora.scaling


def routed_experts_math(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    act_fn: Callable[[Tensor], Tensor],
    lora: dict[str, LoraFactors] | None = None,
) -> Tensor:
    """One routed-experts layer: `x [T, H]`, `top_k_index/top_k_weights [T, K]`, `gate_up [E, 2I, H]`,
    `down [E, H, I]` (all on one device) -> `[T, H]` in x's dtype. Differentiable in x, weights and LoRA factors."""
    num_tokens, top_k = top_k_index.shape
    num_experts = gate_up.shape[0]
    dtype = gate_up.dtype
    lora = lora or {}
    flat = top_k_index.reshape(-1)  # [S], S = T*K
    order = torch.argsort(flat, stable=True)  # [S] rows grouped by expert
    counts_t = torch.bincount(flat, minlength=num_experts)  # [E]
    offsets = torch.cumsum(counts_t, 0, dtype=torch.int32)  # [E]
    counts = counts_t.tolist()  # one host sync per layer pass
    xs = x[order // top_k].to(dtype)  # [S, H]
    hidden = grouped_linear(xs, gate_up, offsets, counts)  # [S, 2I]
    if "gate_up_proj" in lora:
        hidden = hidden + _lora_delta(xs, lora["gate_up_proj"], offsets, counts, dtype)
    gate, up = hidden.chunk(2, dim=-1)  # [S, I] each
    act = act_fn(gate) * up  # [S, I]
    out = grouped_linear(act, down, offsets, counts)  # [S, H]
    if "down_proj" in lora:
        out = out + _lora_delta(act, lora["down_proj"], offsets, counts, dtype)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)  # [S, H], promotes like the stock module
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    out = out[inverse].view(num_tokens, top_k, -1).sum(dim=1)  # [T, H]
    return out.to(x.dtype)


def lora_from_flat(meta: Sequence[tuple[str, float]], params: Sequence[Tensor]) -> dict[str, LoraFactors]:
    """Rebuild the `{target: LoraFactors}` dict from the flat parameter list passed through autograd."""
    return {target: LoraFactors(params[2 * i], params[2 * i + 1], scaling) for i, (target, scaling) in enumerate(meta)}


def recompute_grads(
    run: Callable[[Tensor, Tensor, dict[str, LoraFactors]], Tensor],
    x: Tensor,
    top_k_weights: Tensor,
    lora_meta: Sequence[tuple[str, float]],
    lora_params: Sequence[Tensor],
    grad_out: Tensor,
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """Re-run `run(x, weights, lora)` with autograd on and return grads for `[x, weights, *lora_params]`
    (None where `needs` says the grad is not wanted)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((x, top_k_weights, *lora_params), needs)]
        out = run(leaves[0], leaves[1], lora_from_flat(lora_meta, leaves[2:]))
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
    return [next(grads) if leaf.requires_grad else None for leaf in leaves]


@contextmanager
def intra_op_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with `num_threads` intra-op threads, restoring the previous count (the setting is global)."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _chunks(num_tokens: int, chunk_size: int) -> list[slice]:
    step = max(1, chunk_size)
    return [slice(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


class CpuExecutor:
    """Runs a HostExperts pass on the CPU: inputs move to host, `chunk_size` tokens per call, output moves back."""

    def forward(self, module, x, top_k_index, top_k_weights, lora_meta, lora_params):  # noqa: ANN001, ANN201
        cpu = torch.device("cpu")
        saved = (
            x.detach().to(cpu),  # [T, H]
            top_k_index.to(cpu),  # [T, K]
            top_k_weights.detach().to(cpu),  # [T, K]
            [p.detach().to(cpu) for p in lora_params],
            x.device,
        )
        xc, ic, wc, lc, _ = saved
        lora = lora_from_flat(lora_meta, lc)
        gate_up, down = module.host_weights()
        placement = module.placement
        with torch.no_grad(), intra_op_threads(placement.cpu_threads):
            parts = [
                routed_experts_math(xc[s], ic[s], wc[s], gate_up, down, module.act_fn, lora)
                for s in _chunks(xc.shape[0], placement.chunk_size)
            ]
        out = torch.cat(parts) if parts else torch.zeros_like(xc)
        return out.to(x.device), saved

    def backward(self, module, saved, grad_out, lora_meta, needs):  # noqa: ANN001, ANN201
        xc, ic, wc, lc, device = saved
        gc = grad_out.to("cpu")
        gate_up, down = module.host_weights()
        placement = module.placement
        dx, dw, dlora = [], [], [None] * len(lc)
        with intra_op_threads(placement.cpu_threads):
            for s in _chunks(xc.shape[0], placement.chunk_size):
                index = ic[s]

                def run(x: Tensor, w: Tensor, lora: dict[str, LoraFactors]) -> Tensor:
                    return routed_experts_math(x, index, w, gate_up, down, module.act_fn, lora)

                grads = recompute_grads(run, xc[s], wc[s], lora_meta, lc, gc[s], needs)
                dx.append(grads[0])
                dw.append(grads[1])
                for i, g in enumerate(grads[2:]):
                    if g is not None:
                        dlora[i] = g if dlora[i] is None else dlora[i] + g
        to_dev = lambda t: None if t is None else t.to(device)  # noqa: E731
        grad_x = to_dev(torch.cat(dx)) if needs[0] and dx else None
        grad_w = to_dev(torch.cat(dw)) if needs[1] and dw else None
        return [grad_x, grad_w, *[to_dev(g) for g in dlora]]
