"""`HostExperts`: the drop-in replacement for a transformers routed-experts module, with weights in host memory.

Same forward signature as the stock module (`hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K] ->
[T, H]`). The frozen routed weights are plain host tensors (pinned when CUDA exists), never parameters, so
`model.to(device)` leaves them where they are and they stay out of the state dict (`host_weights()` reads them).
Each pass picks a target from its `ExpertPlacement` (or a forced one): `cpu` computes next to the weights,
`stream` copies them to the GPU through the shared `ExpertStreamer`, `gpu` keeps a resident GPU copy.

The weights may be held quantized (`kllama.experts.quant`: int8 per channel, int4 in groups of 64 columns per row,
fp8 in 128x128 blocks; shapes are always the logical `[E, N, K]`): streamed passes copy the quantized bytes and
dequantize them on the GPU, a resident copy is dequantized once, CPU passes read the quantized bytes
(`kllama.experts.quant_compute`) and a CPU training pass dequantizes the layer for its duration.

A long no-grad pass that streams may leave the layer's first experts to the CPU (`split_for`, from the start-up
measurement `cpu_share`, `kllama.experts.cpu_share`), run by `split_pass.SplitExecutor`; training passes never split
(their backward needs the whole layer on the GPU).

On a machine or model without CUDA (compute device `cpu`), `stream` and `gpu` run the `cpu` path instead, with a
one-time warning: the weights are already where the compute happens, so the result is the same and CPU-only runs of
an `auto` placement keep working.

A pass is a training pass when gradients flow through it (a backward follows), else a no-grad pass; each kind has
its own crossover (placement.py). No-grad passes can be routed through a hook (`expert_pass_hook`): CUDA-graph
capture of a decode step uses it to capture the passes that run on the GPU without a host sync (`capturable`) and
to cut its graphs around the others.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from kllama.errors import KllamaError
from kllama.experts.pinned import pinned_copy
from kllama.experts.cpu_compute import CpuExecutor
from kllama.experts.cpu_share import SplitModel
from kllama.experts.placement import TARGETS, ExpertPlacement, Target
from kllama.experts.quant import (QUANT_DTYPES, ExpertWeight, QuantizedWeight, dequantize, quantize, scheme_of,
                                  weight_nbytes)
from kllama.experts.routed import ExpertFactors, LoraFactors, SavedPass, sync_free
from kllama.experts.shared_overlap import SharedOverlap
from kllama.experts.split_pass import SplitExecutor
from kllama.experts.stream import DeviceExecutor, ExpertStreamer

_EXECUTORS = {"cpu": CpuExecutor(), "stream": DeviceExecutor(stream=True), "gpu": DeviceExecutor(stream=False)}
_SPLIT = SplitExecutor()  # a no-grad `stream` pass whose first experts run on the CPU

PassHook = Callable[["HostExperts", Tensor, Tensor, Tensor], Tensor]
_PASS_HOOK: ContextVar[PassHook | None] = ContextVar("kllama_expert_pass_hook", default=None)


@contextmanager
def expert_pass_hook(hook: PassHook) -> Iterator[None]:
    """Inside the block (this thread/context only), every no-grad HostExperts pass calls `hook(module, x, index,
    weights) -> out` instead of running; the hook runs it with `module.run_pass` or replaces it."""
    token = _PASS_HOOK.set(hook)
    try:
        yield
    finally:
        _PASS_HOOK.reset(token)


def to_host(weight: ExpertWeight, *, pin: bool) -> ExpertWeight:
    """`weight` as contiguous host tensors, pinned when `pin` and CUDA is available (pinned copies run ~3x faster;
    a CPU compute device never copies from host memory, so pinning there would only cost a second copy)."""
    if isinstance(weight, QuantizedWeight):
        return QuantizedWeight(to_host(weight.data, pin=pin), to_host(weight.scale, pin=pin), weight.dtype,
                               weight.projections)
    host = weight.detach()
    if pin and torch.cuda.is_available() and not (host.device.type == "cpu" and host.is_pinned()):
        return pinned_copy(host)  # exact-size pinning: torch's pin_memory() rounds up to a power of two
    return host.to("cpu").contiguous()


class _ExpertsFunction(torch.autograd.Function):
    """Autograd bridge: forward runs the executor without a graph and saves the routing and gate/up pre-activations
    through `save_for_backward` (so activation checkpointing may drop and recompute them); backward hands them to
    the executor, which differentiates by hand."""

    @staticmethod
    def forward(ctx, x, top_k_weights, top_k_index, module, executor, lora_meta, *lora_params):  # noqa: ANN001, ANN205
        keep = any(ctx.needs_input_grad)
        out, saved = executor.forward(module, x, top_k_index, top_k_weights, lora_meta, lora_params, keep)
        ctx.module, ctx.executor, ctx.lora_meta, ctx.lora_params = module, executor, lora_meta, lora_params
        if saved is not None:
            ctx.layout = saved.layout()
            ctx.save_for_backward(*saved.tensors())
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[6:]]
        saved = SavedPass.rebuild(ctx.layout, ctx.saved_tensors)
        grads = ctx.executor.backward(ctx.module, saved, grad_out.contiguous(), ctx.lora_meta, ctx.lora_params, needs)
        return (grads[0], grads[1], None, None, None, None, *grads[2:])


class HostExperts(nn.Module):
    """Routed experts of one MoE layer with frozen weights in host memory and optional expert LoRA.

    `gate_up [E, 2I, H]` (rows: gate then up) and `down [E, H, I]` are kept as they came in: tensors (in their dtype)
    or QuantizedWeights (computing in their `dtype`). `compute_device` is where `stream`/`gpu` passes run (a CUDA
    device) and where LoRA parameters live.
    """

    def __init__(
        self,
        gate_up: ExpertWeight,
        down: ExpertWeight,
        act_fn: Callable[[Tensor], Tensor],
        placement: ExpertPlacement,
        name: str,
        *,
        compute_device: torch.device | str,
    ) -> None:
        super().__init__()
        num_experts, two_inter, hidden = gate_up.shape
        if two_inter % 2 or tuple(down.shape) != (num_experts, hidden, two_inter // 2):
            raise ValueError(f"{name}: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not match")
        if scheme_of(gate_up) != scheme_of(down) or gate_up.dtype != down.dtype:
            raise ValueError(f"{name}: gate_up and down are stored differently ({scheme_of(gate_up)}, "
                             f"{scheme_of(down)})")
        compute_device = torch.device(compute_device)
        if compute_device.type == "cuda" and not torch.cuda.is_available():
            raise KllamaError(f"{name}: compute device {compute_device} requested but no CUDA device is available")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, two_inter // 2
        self.act_fn = act_fn
        self.placement = placement
        self.name = name
        self.compute_device = compute_device
        pin = compute_device.type == "cuda"
        self._gate_up = to_host(gate_up, pin=pin)
        self._down = to_host(down, pin=pin)
        self.dtype = gate_up.dtype  # what the experts compute in (a quantized weight's dequantized dtype)
        self.expert_dtype = scheme_of(gate_up) or str(self.dtype).removeprefix("torch.")  # for reports
        self._resident: tuple[Tensor, Tensor] | None = None
        self.streamer: ExpertStreamer | None = None
        self.forced_target: Target | None = None
        self.cpu_share: SplitModel | None = None  # measured at start-up (auto placements on CUDA)
        # the block's shared experts, computed during a CPU pass (`wire_engine` sets it where the family allows)
        self.shared_overlap: SharedOverlap | None = None
        self.forced_split: int | None = None  # CPU experts of every long no-grad streamed pass (tests, benchmarks)
        self.lora = nn.ModuleDict()  # target name -> ExpertLoRA (kllama.experts.lora)
        self.lora_enabled = True
        self._warned_fallback = False
        # per device: (key of the LoRA they were made from, its per-expert factors); see lora_factors
        self._lora_cache: dict[torch.device, tuple[tuple, dict[str, ExpertFactors]]] = {}

    @classmethod
    def from_stock(
        cls, module: nn.Module, placement: ExpertPlacement, name: str, compute_device: torch.device | str,
        expert_dtype: str | None = None,
    ) -> "HostExperts":
        """Take the weights out of a stock transformers experts module (its parameters are dropped, so no second
        copy stays alive once the stock module is replaced), quantized when `expert_dtype` is `int8`, `int4` or
        `fp8`."""
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
        if expert_dtype in QUANT_DTYPES:
            gate_up, down = quantize(gate_up, expert_dtype, projections=2), quantize(down, expert_dtype)
        host = cls(gate_up, down, module.act_fn, placement, name, compute_device=compute_device)
        module.register_parameter("gate_up_proj", None)
        module.register_parameter("down_proj", None)
        return host

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, experts={self.num_experts}, hidden={self.hidden_dim}, "
            f"inter={self.intermediate_dim}, dtype={self.expert_dtype}, placement={self.placement.mode}"
        )

    def host_weights(self) -> tuple[ExpertWeight, ExpertWeight]:
        """The frozen routed weights `(gate_up [E, 2I, H], down [E, H, I])` in host memory as stored (tensors or
        QuantizedWeights; read-only use)."""
        return self._gate_up, self._down

    def dense_host_weights(self) -> tuple[Tensor, Tensor]:
        """The weights as host tensors in `dtype`: the stored ones, or dequantized copies made for the caller (a CPU
        training pass holds them for its duration)."""
        return dequantize(self._gate_up), dequantize(self._down)

    def resident_weights(self) -> tuple[Tensor, Tensor]:
        """GPU-resident copies of the weights in `dtype` for the `gpu` target, made on first use and kept
        (quantized weights are copied as they are and dequantized on the GPU)."""
        if self._resident is None:
            self._resident = (
                dequantize(self._gate_up.to(self.compute_device, non_blocking=True)),
                dequantize(self._down.to(self.compute_device, non_blocking=True)),
            )
        return self._resident

    def drop_resident(self) -> None:
        """Free the GPU-resident copy (e.g. when the placement changes)."""
        self._resident = None

    def host_bytes(self) -> int:
        """Host memory held by the routed weights (values and scales when quantized)."""
        return weight_nbytes(self._gate_up) + weight_nbytes(self._down)

    def dense_bytes(self) -> int:
        """Bytes of the weights in `dtype`: what a resident GPU copy or a stream slot holds."""
        return 3 * self.num_experts * self.hidden_dim * self.intermediate_dim * self.dtype.itemsize

    def gpu_bytes(self) -> int:
        """GPU memory held by this module alone (resident weights, LoRA and its cached per-expert factors:
        `E*r*(in+out)` elements per projection in `dtype`), excluding the shared stream slots."""
        resident = sum(t.numel() * t.element_size() for t in self._resident) if self._resident else 0
        lora = sum(p.numel() * p.element_size() for p in self.lora.parameters() if p.is_cuda)
        cached = sum(t.numel() * t.element_size() for _, factors in self._lora_cache.values()
                     for pair in factors.values() for t in pair if t.is_cuda)
        return resident + lora + cached

    def target_for(self, num_tokens: int, training: bool = False) -> Target:
        """Target of a pass over `num_tokens` tokens (`training`: a backward follows): the forced one if set, else
        the placement's."""
        target = self.forced_target or self.placement.target_for(num_tokens, training)
        if target not in TARGETS:
            raise KllamaError(f"{self.name}: unknown expert target {target!r}; choose one of {', '.join(TARGETS)}")
        if target != "cpu" and self.compute_device.type != "cuda":
            if not self._warned_fallback:
                warnings.warn(
                    f"{self.name}: expert target {target!r} needs a CUDA compute device; running on the CPU instead",
                    stacklevel=3,
                )
                self._warned_fallback = True
            return "cpu"
        return target

    def split_for(self, num_tokens: int, training: bool = False) -> int:
        """How many of the layer's experts (`[0, k)`) the CPU computes in a pass over `num_tokens` tokens: 0 for
        training passes and passes that do not stream, else `forced_split` if set, else the `cpu_share` model's k."""
        if training or self.target_for(num_tokens, training) != "stream":
            return 0
        if self.forced_split is not None:
            return max(0, min(self.forced_split, self.num_experts))
        return self.cpu_share.plan(num_tokens).cpu_experts if self.cpu_share is not None else 0

    def _active_lora(self) -> tuple[tuple[tuple[str, float], ...], list[Tensor]]:
        if not self.lora_enabled or len(self.lora) == 0:
            return (), []
        meta = tuple((target, lora.scaling) for target, lora in self.lora.items())
        params = [p for lora in self.lora.values() for p in (lora.lora_A, lora.lora_B)]
        return meta, params

    @staticmethod
    def _lora_key(meta: Sequence[tuple[str, float]], params: Sequence[Tensor]) -> tuple | None:
        # what the cached factors were made from: the targets and scalings, and each parameter's identity and version
        # counter (in-place writes under no_grad, load_state_dict's copy_, torch's foreach optimisers move it). A
        # trainable LoRA gets no key: fused AdamW and `.data` writes do not move the counter, so its factors are
        # made in each pass (training passes make them anyway, to differentiate them)
        if any(p.requires_grad for p in params):
            return None
        return tuple(meta), tuple((id(p), p._version) for p in params)

    def lora_factors(self, meta: Sequence[tuple[str, float]], params: Sequence[Tensor], device: torch.device,
                     ) -> dict[str, ExpertFactors]:
        """The active expert LoRA (`meta`, `params` as `_active_lora` gives them) as per-expert factors `{target:
        ExpertFactors(a [E, r, in], b [E, out, r])}` in the weights' dtype on `device` (scaling folded into b), for
        no-grad passes. A frozen LoRA's factors are made once per device and kept until a parameter changes (its
        version counter moves), so decode neither copies the adapter to the host (CPU passes) nor rebuilds the
        factors (GPU passes) at every layer and token.

        A captured decode step (infer/graphs.py) reads the device factors at their addresses on every replay. That
        is safe because they are never remade at inference: the parameters are frozen and never written, and the
        warm-up forwards before a capture make them (`capturable` says no until they exist). Only a write into the
        LoRA (an adapter loaded, training) remakes them, and nothing is captured there."""
        if not meta:
            return {}
        key = self._lora_key(meta, params)
        held = self._lora_cache.get(device)
        if key is not None and held is not None and held[0] == key:
            return held[1]
        factors = {target: LoraFactors(params[2 * i].detach().to(device), params[2 * i + 1].detach().to(device),
                                       scaling).per_expert(self.num_experts, self.dtype)
                   for i, (target, scaling) in enumerate(meta)}
        if key is None:
            self._lora_cache.pop(device, None)  # trainable now: what was kept is stale or soon will be
        else:
            self._lora_cache[device] = (key, factors)
        return factors

    def capturable(self, num_tokens: int) -> bool:
        """Whether a no-grad pass over `num_tokens` tokens runs wholly on the GPU without a host sync or a host copy
        (resident weights and LoRA factors already made, torch's grouped GEMM for the weights and LoRA shapes): a
        CUDA graph can capture it."""
        if self.target_for(num_tokens) != "gpu" or self._resident is None:
            return False
        meta, params = self._active_lora()
        key, held = self._lora_key(meta, params) if meta else None, self._lora_cache.get(self.compute_device)
        if key is not None and (held is None or held[0] != key):
            return False  # made inside a capture, the cached factors' kernels would be replayed at every step
        ranks = [lora.r for lora in self.lora.values()] if self.lora_enabled else []
        return sync_free(self._resident[0], self.hidden_dim, 2 * self.intermediate_dim, self.intermediate_dim, *ranks)

    def run_pass(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The pass itself (what `forward` does without a hook), on the target its size and kind choose."""
        meta, params = self._active_lora()
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, top_k_weights, *params))
        executor = _EXECUTORS[self.target_for(hidden_states.shape[0], training)]
        if executor is _EXECUTORS["stream"] and self.split_for(hidden_states.shape[0], training):
            executor = _SPLIT
        if not training:  # no gradient to ask for: the autograd Function's machinery is pure cost (decode)
            return executor.forward(self, hidden_states, top_k_index, top_k_weights, meta, params, False)[0]
        return _ExpertsFunction.apply(hidden_states, top_k_weights, top_k_index, self, executor, meta, *params)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """`hidden_states [T, H]`, `top_k_index [T, K]`, `top_k_weights [T, K]` -> `[T, H]` (stock semantics)."""
        hook = _PASS_HOOK.get()
        if hook is not None and not torch.is_grad_enabled():
            return hook(self, hidden_states, top_k_index, top_k_weights)
        return self.run_pass(hidden_states, top_k_index, top_k_weights)
