"""The models' RMSNorms through torch's `rms_norm` (one fused kernel each way on CUDA) instead of six eager ops.

transformers writes the RMSNorm of every supported family (DeepSeek-V2/V3, Qwen2/3-MoE, Mixtral, OLMoE; Llama and
Qwen2/3 too) as
`weight * (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)`: an fp32 copy of the activations, the square,
the mean, the product, the cast back and the weight, each a pass over `[T, H]` forward and more backward. On the
V2-Lite DPO step (16k tokens, 27 layers, each norm run for the reference, the policy and the checkpoint's recompute)
these passes took ~100 ms of a 1.38 s step on an H200 (benchmarks/NOTES.md, twelfth session).

`torch.nn.functional.rms_norm` without a weight computes the same normalisation (fp32 inside, one rounding to the
input dtype); the weight is then applied as transformers applies it, so the rounding structure is unchanged. On
the CPU the two give the same bits (tests/model/test_fused_norm.py); on CUDA the fused kernel sums the squares in
its own order, so the variance (and rarely an output's last bit) may differ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# transformers' RMSNorm classes of the supported families (and the dense Llama / Qwen models kllama also trains),
# all of the form above (pinned by a test)
RMS_NORM_CLASSES: tuple[str, ...] = (
    "DeepseekV2RMSNorm", "DeepseekV3RMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "MixtralRMSNorm", "OlmoeRMSNorm",
    "LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
)


class FusedRMSNorm(nn.Module):
    """An RMSNorm computing `weight * rms_norm(x)` with torch's fused op; holds the replaced module's own `weight`
    parameter (same name, so checkpoints and state dicts are unchanged)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        # [..., H] -> [..., H]: normalised in fp32 and rounded to the input dtype, then times the weight
        return self.weight * F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


def _is_transformers_rms_norm(module: nn.Module) -> bool:
    # transformers' own class (a checkpoint's remote code may name a norm alike and compute it otherwise)
    cls = type(module)
    return (cls.__name__ in RMS_NORM_CLASSES and cls.__module__.startswith("transformers.models.")
            and isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 1
            and hasattr(module, "variance_epsilon"))


def fuse_rms_norms(model: nn.Module) -> int:
    """Replace every transformers RMSNorm of a supported family in `model` by a `FusedRMSNorm` over the same weight
    and epsilon; returns how many were replaced (0 for other models, and remote-code models, which keep their own
    norms)."""
    names = [name for name, module in model.named_modules() if _is_transformers_rms_norm(module)]
    for name in names:
        module = model.get_submodule(name)
        model.set_submodule(name, FusedRMSNorm(module.weight, float(module.variance_epsilon)))
    return len(names)
