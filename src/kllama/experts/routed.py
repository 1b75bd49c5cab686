"""The routed-experts math, forward and backward, and the pass structure every target (cpu, stream, gpu) shares.

`experts_forward` is the one definition of what a routed-experts layer computes, so all targets agree by
construction with each other and with transformers' `grouped_mm` / eager experts: rows `(token, slot)` are grouped
by expert, `gate_up` is split `[gate; up]`, `act(gate) * up` goes through `down`, each row is scaled by its routing
weight, and the top-k rows of a token are summed. Expert LoRA adds `scaling * (x @ A_e^T) @ B_e^T` to each
projection, with A/B in PEFT's `ParamWrapper` layout (see lora.py). A pass takes each projection's LoRA either in
that layout (`LoraFactors`: a training pass, whose factors follow the parameters it differentiates) or already as
per-expert factors (`ExpertFactors`: a no-grad pass, from `HostExperts.lora_factors`' cache); both turn into the
per-expert factors through `per_expert`.

A training pass keeps the gate/up pre-activations `hidden [T*K, 2I]` (and the routing) for its backward, which
`experts_backward` differentiates by hand: it needs the frozen weights once more (a streamed layer is usually still
in its slot) but never recomputes the forward. Under non-reentrant activation checkpointing these saved tensors go
through `save_for_backward`, so the first forward keeps nothing and the checkpoint's recompute supplies them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from kllama.experts.swiglu import fused_gated, fused_gated_backward

if TYPE_CHECKING:
    from kllama.experts.module import HostExperts

_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class ExpertFactors(NamedTuple):
    """One projection's expert LoRA per expert in the compute dtype: `a [E, r, in]`, `b [E, out, r]` with the scaling
    folded into b, delta_e = b_e @ a_e (what `expert_factors` makes from PEFT's layout)."""

    a: Tensor  # [E, r, in]
    b: Tensor  # [E, out, r]

    def per_expert(self, num_experts: int, dtype: torch.dtype) -> "ExpertFactors":
        """These factors, checked against the pass (a pass never converts or rebuilds factors made for it)."""
        if self.a.shape[0] != num_experts or self.a.dtype != dtype:
            raise ValueError(f"expert LoRA factors for {self.a.shape[0]} experts in {self.a.dtype} given to a pass "
                             f"over {num_experts} experts in {dtype}")
        return self

    def tail(self, first: int) -> "ExpertFactors":
        """The factors of experts `[first, E)` (views)."""
        return ExpertFactors(self.a[first:], self.b[first:])


class LoraFactors(NamedTuple):
    """One projection's expert LoRA in PEFT's layout: `A [E*r, in]`, `B [out, E*r]`, delta = scaling * B_e @ A_e."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float

    def per_expert(self, num_experts: int, dtype: torch.dtype) -> ExpertFactors:
        """The per-expert factors in `dtype` (`expert_factors`), made anew at each call."""
        return expert_factors(self, num_experts, dtype)


ProjectionLora = LoraFactors | ExpertFactors  # one projection's expert LoRA as a pass takes it


@dataclass
class Routing:
    """Where each `(token, slot)` row goes: rows sorted by expert (stable), with the offsets the GEMMs need. All
    tensors stay on the device; the per-expert counts reach the host only when a per-expert loop asks for them
    (`counts()`), so a CUDA pass through torch's grouped GEMM never waits on the GPU."""

    order: Tensor  # [S] flat row index (token * K + slot) of each sorted row, S = T*K
    tokens: Tensor  # [S] token of each sorted row
    inverse: Tensor  # [S] sorted position of each flat row
    offsets: Tensor  # [E] int32 cumulative row counts
    _counts: list[int] | None = None

    def counts(self) -> list[int]:
        """Rows per expert on the host (one device sync, the first time)."""
        if self._counts is None:
            self._counts = torch.diff(self.offsets, prepend=self.offsets.new_zeros(1)).tolist()
        return self._counts


def token_chunks(num_tokens: int, chunk_size: int) -> list[slice]:
    """`[0, num_tokens)` cut into spans of at most `chunk_size` tokens."""
    step = max(1, chunk_size)
    return [slice(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def route(top_k_index: Tensor, num_experts: int) -> Routing:
    """Group the rows of `top_k_index [T, K]` by expert (no host sync)."""
    top_k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)  # [S]
    order = torch.argsort(flat, stable=True)  # [S]
    # scatter_add_/scatter_ rather than bincount/index_put_: CUDA's bincount reads the max id back to the host
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return Routing(order, order // top_k, inverse, torch.cumsum(counts, 0, dtype=torch.int32))


def _can_group(x: Tensor, *dims: int) -> bool:
    # torch's grouped GEMM (CUDA, SM80+) wants bf16 operands whose inner dims are 16-byte multiples
    # (the same conditions transformers.integrations.moe._can_use_grouped_mm checks for the stock path).
    if _GROUPED_MM is None or not x.is_cuda or x.dtype != torch.bfloat16 or any(d % 8 for d in dims):
        return False
    return torch.cuda.get_device_capability(x.device) >= (8, 0)


def sync_free(weight: Tensor, *dims: int) -> bool:
    """Whether a pass on `weight`'s device with these inner dims runs without a host sync (torch's grouped GEMM on
    CUDA: bf16 weights, 16-byte-aligned dims, SM80+), which is what a CUDA graph can capture."""
    return _can_group(weight, *dims)


def grouped_linear(x: Tensor, weight: Tensor, routing: Routing) -> Tensor:
    """`x [S, in]` (rows sorted by expert) times each expert's `weight [E, out, in]`^T -> `[S, out]`.

    Uses torch's grouped GEMM where it applies (CUDA bf16, aligned), else one matmul per expert with rows.
    `weight` may be a transposed view (the backward multiplies by `W_e` instead of `W_e^T`).
    """
    if weight.dtype == x.dtype and _can_group(x, weight.shape[-1], weight.shape[-2]):
        return _GROUPED_MM(x, weight.transpose(-2, -1), offs=routing.offsets)
    pieces, start = [], 0
    for expert, count in enumerate(routing.counts()):
        if count:
            pieces.append(x[start : start + count] @ weight[expert].T)  # [n, out]
            start += count
    if not pieces:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(pieces)


def grouped_outer(p: Tensor, q: Tensor, routing: Routing) -> Tensor:
    """Per expert `p_e^T @ q_e` over its rows: `p [S, m]`, `q [S, n]` (rows sorted by expert) -> `[E, m, n]`
    (a weight gradient; experts without rows get zeros)."""
    if p.dtype == q.dtype and _can_group(p, p.shape[1], q.shape[1]):
        return _GROUPED_MM(p.t(), q, offs=routing.offsets)
    counts = routing.counts()
    out = p.new_zeros(len(counts), p.shape[1], q.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            out[expert] = p[start : start + count].T @ q[start : start + count]
            start += count
    return out


def expert_factors(lora: LoraFactors, num_experts: int, dtype: torch.dtype) -> ExpertFactors:
    """PEFT's flat factors as per-expert `a [E, r, in]` and `b [E, out, r]` in `dtype`, with the scaling folded
    into b."""
    a = lora.lora_A.to(dtype).view(num_experts, -1, lora.lora_A.shape[-1])  # rows e*r:(e+1)*r
    out_features = lora.lora_B.shape[0]
    # PEFT reads lora_B as [out, r, E]: expert e owns columns e, e+E, e+2E, ...
    b = (lora.lora_B * lora.scaling).to(dtype).view(out_features, -1, num_experts).permute(2, 0, 1).contiguous()
    return ExpertFactors(a, b)


def _lora_delta(x: Tensor, lora: ProjectionLora, routing: Routing, dtype: torch.dtype) -> Tensor:
    a, b = lora.per_expert(routing.offsets.numel(), dtype)
    low = grouped_linear(x, a, routing)  # [S, r]
    return grouped_linear(low, b, routing)  # [S, out]


def _as_param_grads(grad_a: Tensor, grad_b: Tensor, lora: LoraFactors) -> tuple[Tensor, Tensor]:
    # per-expert grads `[E, r, in]` (of a) and `[E, out, r]` (of the unscaled B_e) back to PEFT's flat layout
    flat_a = grad_a.reshape(lora.lora_A.shape)
    flat_b = (grad_b * lora.scaling).permute(1, 2, 0).reshape(lora.lora_B.shape)  # [out, r*E], column r_i*E + e
    return flat_a.to(lora.lora_A.dtype), flat_b.to(lora.lora_B.dtype)


def _gated(act_fn: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:
    gate, up = hidden.chunk(2, dim=-1)  # [S, I] each
    return act_fn(gate) * up  # [S, I]


def _unsort_sum(rows: Tensor, routing: Routing, num_tokens: int) -> Tensor:
    # sorted rows [S, D] back to (token, slot) order, summed over the K slots of each token -> [T, D] (deterministic,
    # unlike an atomic index_add; a bf16 sum accumulates in fp32)
    return rows[routing.inverse].view(num_tokens, -1, rows.shape[-1]).sum(dim=1)


def _row_weights(top_k_weights: Tensor, routing: Routing, dtype: torch.dtype) -> Tensor:
    return top_k_weights.reshape(-1)[routing.order].unsqueeze(-1).to(dtype)  # [S, 1]


def experts_forward(
    x: Tensor,
    routing: Routing,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    act_fn: Callable[[Tensor], Tensor],
    lora: Mapping[str, ProjectionLora] | None = None,
) -> tuple[Tensor, Tensor]:
    """One routed-experts layer: `x [T, H]`, routing of `top_k_index [T, K]`, `top_k_weights [T, K]`,
    `gate_up [E, 2I, H]`, `down [E, H, I]` (one device) -> (`out [T, H]` in x's dtype, `hidden [S, 2I]`, the gate/up
    pre-activations a backward needs). Differentiable in x, the routing weights and the LoRA factors.

    The routing weight scales each row before `down` (which is linear, LoRA included): one pass over `[S, I]` in the
    weights' dtype instead of an fp32 `[S, H]`."""
    dtype = gate_up.dtype
    lora = lora or {}
    xs = x[routing.tokens].to(dtype)  # [S, H]
    hidden = grouped_linear(xs, gate_up, routing)  # [S, 2I]
    if "gate_up_proj" in lora:
        hidden = hidden + _lora_delta(xs, lora["gate_up_proj"], routing, dtype)
    ws = _row_weights(top_k_weights, routing, dtype)  # [S, 1]
    scaled = fused_gated(hidden, ws, act_fn)  # [S, I], one kernel on CUDA
    if scaled is None:
        scaled = _gated(act_fn, hidden) * ws
    out = grouped_linear(scaled, down, routing)  # [S, H]
    if "down_proj" in lora:
        out = out + _lora_delta(scaled, lora["down_proj"], routing, dtype)
    return _unsort_sum(out, routing, x.shape[0]).to(x.dtype), hidden


def routed_experts_math(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    act_fn: Callable[[Tensor], Tensor],
    lora: Mapping[str, ProjectionLora] | None = None,
) -> Tensor:
    """`experts_forward` from `top_k_index [T, K]` directly -> `[T, H]` (inference, probes, reference math)."""
    return experts_forward(x, route(top_k_index, gate_up.shape[0]), top_k_weights, gate_up, down, act_fn, lora)[0]


def experts_backward(
    x: Tensor,
    routing: Routing,
    top_k_weights: Tensor,
    hidden: Tensor,
    gate_up: Tensor,
    down: Tensor,
    act_fn: Callable[[Tensor], Tensor],
    lora_meta: Sequence[tuple[str, float]],
    lora_params: Sequence[Tensor],
    grad_out: Tensor,
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """Grads of `experts_forward` for `[x, top_k_weights, *lora_params]` (None where `needs` says not wanted) from
    the saved `hidden [S, 2I]`, without recomputing the forward's GEMMs.

    With `ga = g_s @ W_down,e` (+ the down LoRA's transpose) the grad of a row's scaled activation, the routing
    weight gets `<ga, act>`, `act` gets `w_s * ga`, and x gets `d_hidden @ W_gate_up,e` (+ LoRA). LoRA factor grads
    are per-expert outer products (`grouped_outer`); the routing weight is applied to the `[S, r]` side."""
    dtype = gate_up.dtype
    want_x, want_w, *want_lora = needs
    num_tokens = x.shape[0]
    num_experts = routing.offsets.numel()
    lora = lora_from_flat(lora_meta, [p.detach() for p in lora_params])
    position = {target: i for i, (target, _) in enumerate(lora_meta)}
    grad_lora: list[Tensor | None] = [None] * len(lora_params)
    gs = grad_out[routing.tokens].to(dtype)  # [S, H]
    ws = _row_weights(top_k_weights, routing, dtype)  # [S, 1]
    ga = grouped_linear(gs, down.transpose(-2, -1), routing)  # [S, I]
    down_lora = None
    if "down_proj" in lora:
        i = position["down_proj"]
        a, b = expert_factors(lora["down_proj"], num_experts, dtype)  # [E, r, I], [E, H, r]
        low_g = grouped_linear(gs, b.transpose(-2, -1), routing)  # [S, r]
        ga = ga + grouped_linear(low_g, a.transpose(-2, -1), routing)
        if want_lora[2 * i] or want_lora[2 * i + 1]:
            down_lora = (i, a, low_g)
    fused = fused_gated_backward(hidden, ga, ws, act_fn, want_act=down_lora is not None, want_weight_grad=want_w)
    if fused is not None:  # one kernel on CUDA
        d_hidden, act, dw_rows = fused
    else:
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            act_graph = _gated(act_fn, h)  # [S, I]
        act = act_graph.detach()
        dw_rows = (ga * act).sum(-1, dtype=torch.float32) if want_w else None  # [S]
        d_hidden = torch.autograd.grad(act_graph, h, (ga * ws).to(act.dtype))[0].to(dtype)  # [S, 2I]
    if down_lora is not None:
        i, a, low_g = down_lora
        low_act = grouped_linear(act, a, routing) * ws  # [S, r]: scaled rows times A_e^T
        grad_a = grouped_outer(low_g * ws, act, routing)  # [E, r, I]
        grad_b = grouped_outer(gs, low_act, routing)  # [E, H, r]
        pair = _as_param_grads(grad_a, grad_b, lora["down_proj"])
        grad_lora[2 * i : 2 * i + 2] = [g if want_lora[2 * i + j] else None for j, g in enumerate(pair)]
    grad_w = None
    if want_w:
        grad_w = dw_rows[routing.inverse].view(num_tokens, -1).to(top_k_weights.dtype)  # [T, K]
    dxs = grouped_linear(d_hidden, gate_up.transpose(-2, -1), routing) if want_x else None  # [S, H]
    if "gate_up_proj" in lora:
        i = position["gate_up_proj"]
        a, b = expert_factors(lora["gate_up_proj"], num_experts, dtype)  # [E, r, H], [E, 2I, r]
        low_h = grouped_linear(d_hidden, b.transpose(-2, -1), routing)  # [S, r]
        if want_x:
            dxs = dxs + grouped_linear(low_h, a.transpose(-2, -1), routing)
        if want_lora[2 * i] or want_lora[2 * i + 1]:
            xs = x[routing.tokens].to(dtype)  # [S, H]
            grad_a = grouped_outer(low_h, xs, routing)  # [E, r, H]
            grad_b = grouped_outer(d_hidden, grouped_linear(xs, a, routing), routing)  # [E, 2I, r]
            pair = _as_param_grads(grad_a, grad_b, lora["gate_up_proj"])
            grad_lora[2 * i : 2 * i + 2] = [g if want_lora[2 * i + j] else None for j, g in enumerate(pair)]
    grad_x = _unsort_sum(dxs, routing, num_tokens).to(x.dtype) if dxs is not None else None
    return [grad_x, grad_w, *grad_lora]


def lora_from_flat(meta: Sequence[tuple[str, float]], params: Sequence[Tensor]) -> dict[str, LoraFactors]:
    """Rebuild the `{target: LoraFactors}` dict from the flat parameter list passed through autograd."""
    return {target: LoraFactors(params[2 * i], params[2 * i + 1], scaling) for i, (target, scaling) in enumerate(meta)}


@dataclass
class SavedPass:
    """What a training pass keeps for its backward, on the compute device: the inputs and, per token chunk, the
    routing and the `hidden` pre-activations. `tensors()` + `layout()` split it for `ctx.save_for_backward`
    (so activation checkpointing can drop and recompute it); `rebuild` joins them again."""

    x: Tensor  # [T, H]
    top_k_weights: Tensor  # [T, K]
    chunks: list[tuple[slice, Routing, Tensor]]  # (token span, its routing, its hidden [S, 2I])

    def tensors(self) -> list[Tensor]:
        per_chunk = [t for _, r, hidden in self.chunks for t in (r.order, r.tokens, r.inverse, r.offsets, hidden)]
        return [self.x, self.top_k_weights, *per_chunk]

    def layout(self) -> list[slice]:
        return [span for span, _, _ in self.chunks]

    @staticmethod
    def rebuild(layout: list[slice], tensors: Sequence[Tensor]) -> "SavedPass":
        x, weights, *rest = tensors
        chunks = []
        for i, span in enumerate(layout):
            order, tokens, inverse, offsets, hidden = rest[5 * i : 5 * i + 5]
            chunks.append((span, Routing(order, tokens, inverse, offsets), hidden))
        return SavedPass(x, weights, chunks)


class PassExecutor:
    """The structure of a routed-experts pass, shared by every target; subclasses say where it runs (`device`), in
    which token chunks, with which copy of the weights, and what to do once its kernels are queued (`done`).

    Forward: route every chunk first (before any wait for streamed weights), then get the weights and run.
    Backward: get the weights again and differentiate each chunk from its saved `hidden`."""

    def device(self, module: "HostExperts") -> torch.device:
        return module.compute_device

    def chunks(self, module: "HostExperts", num_tokens: int) -> list[slice]:
        """Token spans of at most the placement's `chunk_size` (KTransformers' key, 8192 by default): the pass's
        transient buffers (gathered rows, pre-activations' gradients: ~3 GB for a 16k-token V2-Lite backward) exist
        for one span at a time; the saved pre-activations are those of the whole pass either way."""
        return token_chunks(num_tokens, module.placement.chunk_size)

    def weights(self, module: "HostExperts", num_tokens: int, backward: bool, training: bool) -> tuple[Tensor, Tensor]:
        """The weights a pass computes with; `training` says a backward follows (it decides which layers stream)."""
        raise NotImplementedError

    def done(self, module: "HostExperts", backward: bool) -> None:
        """Called once a pass's kernels are queued (streaming releases its weight slot here)."""

    def context(self, module: "HostExperts") -> AbstractContextManager:
        return nullcontext()

    def forward(
        self,
        module: "HostExperts",
        x: Tensor,
        top_k_index: Tensor,
        top_k_weights: Tensor,
        lora_meta: Sequence[tuple[str, float]],
        lora_params: Sequence[Tensor],
        keep: bool,
    ) -> tuple[Tensor, SavedPass | None]:
        """`out [T, H]` on x's device, and what the backward needs when `keep` (a gradient will be asked for)."""
        device = self.device(module)
        xd, idx, w = x.detach().to(device), top_k_index.to(device), top_k_weights.detach().to(device)
        if keep:  # a training pass: the factors of the parameters it differentiates, made in each pass
            lora: Mapping[str, ProjectionLora] = lora_from_flat(lora_meta, [p.detach().to(device) for p in lora_params])
        else:  # a frozen LoRA's are made once and kept (HostExperts.lora_factors), not at every decode step
            lora = module.lora_factors(lora_meta, lora_params, device)
        spans = self.chunks(module, xd.shape[0])
        outs, chunks = [], []
        with torch.no_grad(), self.context(module):
            routings = [route(idx[s], module.num_experts) for s in spans]
            gate_up, down = self.weights(module, xd.shape[0], backward=False, training=keep)
            for span, routing in zip(spans, routings):
                out, hidden = experts_forward(xd[span], routing, w[span], gate_up, down, module.act_fn, lora)
                outs.append(out)
                if keep:
                    chunks.append((span, routing, hidden))
            self.done(module, backward=False)
        out = torch.cat(outs) if outs else torch.zeros_like(xd)
        return out.to(x.device), (SavedPass(xd, w, chunks) if keep else None)

    def backward(
        self,
        module: "HostExperts",
        saved: SavedPass,
        grad_out: Tensor,
        lora_meta: Sequence[tuple[str, float]],
        lora_params: Sequence[Tensor],
        needs: Sequence[bool],
    ) -> list[Tensor | None]:
        """Grads for `[x, top_k_weights, *lora_params]`, each on the device its input came from."""
        device = self.device(module)
        g = grad_out.to(device)
        lora_here = [p.detach().to(device) for p in lora_params]
        dx, dw, dlora = [], [], [None] * len(lora_params)
        with self.context(module):
            gate_up, down = self.weights(module, saved.x.shape[0], backward=True, training=True)
            for span, routing, hidden in saved.chunks:
                grads = experts_backward(saved.x[span], routing, saved.top_k_weights[span], hidden, gate_up, down,
                                         module.act_fn, lora_meta, lora_here, g[span], needs)
                dx.append(grads[0])
                dw.append(grads[1])
                for i, grad in enumerate(grads[2:]):
                    if grad is not None:
                        dlora[i] = grad if dlora[i] is None else dlora[i] + grad
            self.done(module, backward=True)
        origin = grad_out.device
        grad_x = torch.cat(dx).to(origin) if needs[0] and dx else None
        grad_w = torch.cat(dw).to(origin) if needs[1] and dw else None
        return [grad_x, grad_w, *[None if g is None else g.to(p.device) for g, p in zip(dlora, lora_params)]]
