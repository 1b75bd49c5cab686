"""Preference losses as pure functions of sequence log-probabilities (DPO and its relatives, ORPO, SimPO).

Every loss maps the policy's (and, for most, the frozen reference's) log-probabilities of the chosen and the rejected
response of each pair to a per-pair loss `[B]`. Formulas follow TRL's `DPOTrainer.dpo_loss` (TRL's loss-type names)
and, for `orpo` / `simpo`, LLaMA-Factory's DPO trainer, which in turn follows the ORPO / SimPO papers.

Which log-probability each loss expects (the caller computes them, see `kllama.train.logprobs`):

| loss       | reference | log-probs the caller passes                                   |
|------------|-----------|---------------------------------------------------------------|
| sigmoid    | yes       | summed over response tokens (`pref_label_smoothing` = cDPO)    |
| hinge      | yes       | summed                                                        |
| ipo        | yes       | length-averaged (policy and reference)                        |
| robust     | yes       | summed                                                        |
| exo_pair   | yes       | summed                                                        |
| nca_pair   | yes       | summed                                                        |
| bco_pair   | yes       | summed; plus `bco_delta`, the running mean of rewards          |
| apo_zero   | yes       | summed                                                        |
| apo_down   | yes       | summed                                                        |
| sppo_hard  | yes       | summed                                                        |
| discopop   | yes       | summed                                                        |
| orpo       | no        | length-averaged (policy only)                                 |
| simpo      | no        | length-averaged (policy only)                                 |

The averaged set (`NEEDS_AVERAGED_LOGPS`) is LLaMA-Factory's: it divides by the response length for ipo, orpo and
simpo, for the policy and the reference alike.

Rewards (the logged `rewards/*` metrics): `beta * (policy - reference)`, detached, for losses with a reference;
`beta * policy` (detached) for the reference-free ones (`REFERENCE_FREE`), as LLaMA-Factory does.

What `losses` contains and what the trainer adds (LLaMA-Factory's contract, `pref_ftx` = its `ftx_gamma`):
* `orpo` already contains its SFT term: `losses = -chosen_avg + beta * odds_ratio_term` (use `orpo_terms` to log the
  two parts separately as `sft_loss` / `odds_ratio_loss`).
* For every loss type, when `pref_ftx > 0` the trainer adds `pref_ftx * sft_term(chosen_avg_logps)` to `losses`
  (so ORPO with `pref_ftx > 0` counts the NLL twice, exactly as LLaMA-Factory does), then takes `losses.mean()`.
* `bco_pair`: the trainer keeps the running mean of rewards (`RunningMean`), updating it with
  `bco_batch_reward(chosen_rewards, rejected_rewards)` *before* calling the loss, and passes its `mean` as
  `bco_delta` (TRL's order).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kllama.errors import KllamaError


@dataclass(frozen=True)
class LossParams:
    """Scalar hyper-parameters shared by the loss functions (names as in LLaMA-Factory / TRL)."""

    beta: float  # pref_beta
    label_smoothing: float = 0.0  # dpo_label_smoothing: cDPO / robust / exo_pair epsilon
    simpo_gamma: float = 0.5  # SimPO target reward margin
    discopop_tau: float = 0.05  # DiscoPOP temperature
    bco_delta: float | torch.Tensor | None = None  # running mean of rewards, bco_pair only


# A loss function: (chosen, rejected, ref_chosen, ref_rejected, params) -> losses, all `[B]`.
# Reference-free ones receive None references.
LossFn = Callable[..., torch.Tensor]


def _dpo_logits(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> torch.Tensor:
    # How much more the policy prefers chosen over rejected than the reference does.  # [B]
    return (chosen - rejected) - (ref_chosen - ref_rejected)


def sigmoid_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); with `label_smoothing` > 0 the conservative cDPO variant."""
    z = p.beta * _dpo_logits(chosen, rejected, ref_chosen, ref_rejected)  # [B]
    eps = p.label_smoothing
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def robust_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate `label_smoothing`; equals DPO at 0."""
    eps = p.label_smoothing
    if not 0 <= eps < 0.5:
        raise KllamaError(f"pref_loss=robust needs 0 <= dpo_label_smoothing < 0.5, got {eps}; lower it")
    z = p.beta * _dpo_logits(chosen, rejected, ref_chosen, ref_rejected)  # [B]
    return (-F.logsigmoid(z) * (1 - eps) + F.logsigmoid(-z) * eps) / (1 - 2 * eps)


def exo_pair_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """EXO (Ji et al. 2024, eq. 16): reverse KL from the model's pair distribution to the smoothed label.

    `label_smoothing` = 0 is replaced by 1e-3 (the label distribution must not put zero mass anywhere), as TRL does.
    """
    eps = p.label_smoothing or 1e-3
    if not 0 < eps < 1:
        raise KllamaError(f"pref_loss=exo_pair needs 0 <= dpo_label_smoothing < 1, got {p.label_smoothing}")
    z = p.beta * _dpo_logits(chosen, rejected, ref_chosen, ref_rejected)  # [B]
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def hinge_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """SLiC-style hinge on the DPO margin (Zhao et al. 2023): `relu(1 - beta * margin)`."""
    return torch.relu(1 - p.beta * _dpo_logits(chosen, rejected, ref_chosen, ref_rejected))


def ipo_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17; beta plays tau): squared distance of the margin to `1 / (2 beta)`."""
    return (_dpo_logits(chosen, rejected, ref_chosen, ref_rejected) - 1 / (2 * p.beta)) ** 2


def bco_pair_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024): chosen reward above, rejected reward below the running mean `bco_delta`."""
    if p.bco_delta is None:
        raise ValueError("pref_loss=bco_pair needs bco_delta, the running mean of rewards kept by the trainer")
    r_chosen = p.beta * (chosen - ref_chosen)  # [B]
    r_rejected = p.beta * (rejected - ref_rejected)  # [B]
    return -F.logsigmoid(r_chosen - p.bco_delta) - F.logsigmoid(-(r_rejected - p.bco_delta))


def sppo_hard_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """SPPO (Wu et al. 2024), hard win probabilities (chosen 1, rejected 0): log-ratios pushed to +-1/(2 beta)."""
    a = chosen - ref_chosen  # [B]
    b = rejected - ref_rejected  # [B]
    return (a - 0.5 / p.beta) ** 2 + (b + 0.5 / p.beta) ** 2


def nca_pair_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """NCA (Chen et al. 2024) on pairs: absolute (not relative) rewards, so chosen likelihood is kept up."""
    r_chosen = p.beta * (chosen - ref_chosen)  # [B]
    r_rejected = p.beta * (rejected - ref_rejected)  # [B]
    return -F.logsigmoid(r_chosen) - 0.5 * F.logsigmoid(-r_chosen) - 0.5 * F.logsigmoid(-r_rejected)


def apo_zero_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise chosen and lower rejected likelihood, each on its own."""
    return (1 - torch.sigmoid(p.beta * (chosen - ref_chosen))) + torch.sigmoid(p.beta * (rejected - ref_rejected))


def apo_down_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """APO-down (eq. 8): lower the chosen likelihood, and the rejected one more (chosen worse than the model's own)."""
    chosen_ratio = chosen - ref_chosen  # [B]
    rejected_ratio = rejected - ref_rejected  # [B]
    return torch.sigmoid(p.beta * chosen_ratio) + (1 - torch.sigmoid(p.beta * (chosen_ratio - rejected_ratio)))


def discopop_loss(
    chosen: torch.Tensor,  # [B]
    rejected: torch.Tensor,  # [B]
    ref_chosen: torch.Tensor,  # [B]
    ref_rejected: torch.Tensor,  # [B]
    p: LossParams,
) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024, eq. 5): logistic and exponential losses blended by `sigmoid(z / tau)`."""
    z = p.beta * _dpo_logits(chosen, rejected, ref_chosen, ref_rejected)  # [B]
    mix = torch.sigmoid(z / p.discopop_tau)  # [B]
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    # log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): expm1 near 0, log1p far from it.
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_terms(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's two parts from length-averaged policy log-probs: (SFT NLL on chosen, -log sigmoid(log odds ratio)).

    The odds of a response are `p / (1 - p)` with `p = exp(avg log-prob)`; ORPO (Hong et al. 2024) pushes the log of
    chosen-odds / rejected-odds up. Both returned tensors are `[B]`.
    """
    log_odds = (chosen_avg - rejected_avg) - (_log1m_exp(chosen_avg) - _log1m_exp(rejected_avg))  # [B]
    return -chosen_avg, -F.logsigmoid(log_odds)


def orpo_loss(
    chosen: torch.Tensor,  # [B] length-averaged
    rejected: torch.Tensor,  # [B] length-averaged
    ref_chosen: torch.Tensor | None,  # unused
    ref_rejected: torch.Tensor | None,  # unused
    p: LossParams,
) -> torch.Tensor:
    """ORPO as LLaMA-Factory defines it: `-chosen_avg + beta * odds_ratio_term` (the SFT term is included)."""
    sft, odds_ratio = orpo_terms(chosen, rejected)
    return sft + p.beta * odds_ratio


def simpo_loss(
    chosen: torch.Tensor,  # [B] length-averaged
    rejected: torch.Tensor,  # [B] length-averaged
    ref_chosen: torch.Tensor | None,  # unused
    ref_rejected: torch.Tensor | None,  # unused
    p: LossParams,
) -> torch.Tensor:
    """SimPO (Meng et al. 2024): `-log sigmoid(beta * (chosen_avg - rejected_avg) - gamma)`, no reference.

    `label_smoothing` > 0 smooths it like cDPO (TRL's CPOTrainer does; LLaMA-Factory has no smoothing, same at 0).
    """
    z = p.beta * (chosen - rejected) - p.simpo_gamma  # [B]
    eps = p.label_smoothing
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "sppo_hard": sppo_hard_loss,
    "discopop": discopop_loss,
    "orpo": orpo_loss,
    "simpo": simpo_loss,
}

# Losses computed from the policy alone: the trainer skips the reference forward for them.
REFERENCE_FREE: frozenset[str] = frozenset({"orpo", "simpo"})

# Losses that expect log-probs divided by the number of response tokens (others expect sums).
NEEDS_AVERAGED_LOGPS: frozenset[str] = frozenset({"ipo", "orpo", "simpo"})


def check_loss_type(loss_type: str) -> None:
    """Raise `KllamaError` naming the valid choices when `loss_type` is not a known preference loss."""
    if loss_type not in LOSSES:
        raise KllamaError(f"unknown pref_loss {loss_type!r}; choose one of: {', '.join(LOSSES)}")


def preference_loss(
    loss_type: str,
    chosen_logps: torch.Tensor,  # [B]
    rejected_logps: torch.Tensor,  # [B]
    ref_chosen_logps: torch.Tensor | None,  # [B] or None for reference-free losses
    ref_rejected_logps: torch.Tensor | None,  # [B] or None for reference-free losses
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss and the detached implicit rewards: `(losses, chosen_rewards, rejected_rewards)`, `[B]`.

    `loss_type` is a key of `LOSSES`; pass summed or length-averaged log-probs as `NEEDS_AVERAGED_LOGPS` says and
    `None` references for the `REFERENCE_FREE` losses (references passed to them are ignored). The caller reduces
    `losses` (mean) and adds `pref_ftx * sft_term(...)` itself; see the module docstring for the exact contract.
    """
    check_loss_type(loss_type)
    reference_free = loss_type in REFERENCE_FREE
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"pref_loss={loss_type} needs reference log-probs; only {sorted(REFERENCE_FREE)} do not")
    params = LossParams(
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        discopop_tau=discopop_tau,
        bco_delta=bco_delta,
    )
    if reference_free:
        losses = LOSSES[loss_type](chosen_logps, rejected_logps, None, None, params)
        chosen_rewards = beta * chosen_logps.detach()  # [B]
        rejected_rewards = beta * rejected_logps.detach()  # [B]
    else:
        losses = LOSSES[loss_type](chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, params)
        chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()  # [B]
        rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()  # [B]
    return losses, chosen_rewards, rejected_rewards


def sft_term(chosen_logps: torch.Tensor, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The `pref_ftx` SFT term, the NLL of the chosen response per token: `-chosen_logps / num_tokens`, `[B]`.

    Pass summed log-probs with their token counts, or already averaged log-probs and `num_tokens=None`
    (LLaMA-Factory uses the averaged NLL, whatever the loss type).
    """
    if num_tokens is None:
        return -chosen_logps
    return -chosen_logps / num_tokens.clamp(min=1).to(chosen_logps.dtype)


def bco_batch_reward(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """The batch statistic `bco_pair` tracks: the mean of all chosen and rejected rewards (a detached scalar)."""
    return torch.cat((chosen_rewards, rejected_rewards)).mean().detach()


@dataclass
class RunningMean:
    """Running mean of per-batch values for `bco_pair`'s `bco_delta` (each update counts as one sample, as in TRL).

    Under data parallelism, average the batch value across ranks before `update` so every rank holds the same mean.
    """

    mean: float = 0.0
    count: int = 0

    def update(self, value: float | torch.Tensor) -> float:
        """Fold one batch value into the mean and return the new mean."""
        self.count += 1
        self.mean += (float(value) - self.mean) / self.count
        return self.mean
