"""Preference losses: each value derived by hand with plain `math` on concrete numbers."""
from __future__ import annotations

import math

import pytest
import torch

from kllama import KllamaError
from kllama.train.losses import (
    LOSSES,
    NEEDS_AVERAGED_LOGPS,
    REFERENCE_FREE,
    RunningMean,
    bco_batch_reward,
    orpo_terms,
    preference_loss,
    sft_term,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log(1 + math.exp(-x))


# Two pairs of summed log-probs. Pair 0: policy margin 2, reference margin 0.5 -> DPO logit 1.5, beta*logit 0.15;
# chosen log-ratio +1, rejected log-ratio -0.5. Pair 1: policy margin -2, reference margin 0 -> logit -2, z = -0.2;
# chosen log-ratio -1, rejected log-ratio +1.
CHOSEN = [-10.0, -20.0]
REJECTED = [-12.0, -18.0]
REF_CHOSEN = [-11.0, -19.0]
REF_REJECTED = [-11.5, -19.0]
BETA = 0.1


def run(loss_type: str, **kwargs) -> list[float]:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    losses, _, _ = preference_loss(
        loss_type, t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta=kwargs.pop("beta", BETA), **kwargs
    )
    return losses.tolist()


# expected per-pair losses, worked out from the numbers above
HAND: dict[str, tuple[dict, list[float]]] = {
    "sigmoid": ({}, [-logsig(0.15), -logsig(-0.2)]),
    "hinge": ({}, [1 - 0.15, 1 + 0.2]),
    # IPO: (logit - 1/(2*0.1))^2 = (1.5 - 5)^2, (-2 - 5)^2
    "ipo": ({}, [12.25, 49.0]),
    "robust": (
        {"label_smoothing": 0.1},
        [(-logsig(0.15) * 0.9 + logsig(-0.15) * 0.1) / 0.8, (-logsig(-0.2) * 0.9 + logsig(0.2) * 0.1) / 0.8],
    ),
    # EXO with label_smoothing 0 uses eps = 1e-3
    "exo_pair": (
        {},
        [
            sig(0.15) * (logsig(0.15) - math.log(0.999)) + sig(-0.15) * (logsig(-0.15) - math.log(1e-3)),
            sig(-0.2) * (logsig(-0.2) - math.log(0.999)) + sig(0.2) * (logsig(0.2) - math.log(1e-3)),
        ],
    ),
    # NCA: chosen reward 0.1*1, rejected reward 0.1*-0.5 (pair 0); -0.1, 0.1 (pair 1)
    "nca_pair": (
        {},
        [
            -logsig(0.1) - 0.5 * logsig(-0.1) - 0.5 * logsig(0.05),
            -logsig(-0.1) - 0.5 * logsig(0.1) - 0.5 * logsig(-0.1),
        ],
    ),
    # BCO with running mean 0.02
    "bco_pair": (
        {"bco_delta": 0.02},
        [-logsig(0.1 - 0.02) - logsig(0.05 + 0.02), -logsig(-0.1 - 0.02) - logsig(-0.1 + 0.02)],
    ),
    "apo_zero": ({}, [(1 - sig(0.1)) + sig(-0.05), (1 - sig(-0.1)) + sig(0.1)]),
    # APO-down: sigmoid(beta*chosen_ratio) + 1 - sigmoid(beta*(chosen_ratio - rejected_ratio))
    "apo_down": ({}, [sig(0.1) + 1 - sig(0.15), sig(-0.1) + 1 - sig(-0.2)]),
    # SPPO-hard: (a - 5)^2 + (b + 5)^2 with a, b the chosen / rejected log-ratios
    "sppo_hard": ({}, [(1 - 5) ** 2 + (-0.5 + 5) ** 2, (-1 - 5) ** 2 + (1 + 5) ** 2]),
    # DiscoPOP, tau 0.05: mix = sigmoid(z / 0.05)
    "discopop": (
        {},
        [
            -logsig(0.15) * (1 - sig(3.0)) + math.exp(-0.15) * sig(3.0),
            -logsig(-0.2) * (1 - sig(-4.0)) + math.exp(0.2) * sig(-4.0),
        ],
    ),
}


@pytest.mark.parametrize("loss_type", sorted(HAND))
def test_reference_loss_matches_hand_value(loss_type: str) -> None:
    kwargs, expected = HAND[loss_type]
    assert run(loss_type, **kwargs) == pytest.approx(expected, rel=1e-9)


def test_cdpo_label_smoothing_hand_value_and_differs_from_plain() -> None:
    got = run("sigmoid", label_smoothing=0.2)
    assert got == pytest.approx([-logsig(0.15) * 0.8 - logsig(-0.15) * 0.2, -logsig(-0.2) * 0.8 - logsig(0.2) * 0.2])
    assert got != pytest.approx(run("sigmoid"))


def test_orpo_hand_value_includes_sft_term() -> None:
    # averaged log-probs: chosen -0.5, rejected -1.2; odds = p / (1 - p) with p = exp(avg)
    chosen, rejected = torch.tensor([-0.5], dtype=torch.float64), torch.tensor([-1.2], dtype=torch.float64)
    log_odds = 0.7 - (math.log(1 - math.exp(-0.5)) - math.log(1 - math.exp(-1.2)))
    losses, c_rew, r_rew = preference_loss("orpo", chosen, rejected, None, None, beta=0.1)
    assert losses.item() == pytest.approx(0.5 + 0.1 * -logsig(log_odds), rel=1e-9)
    sft, odds_ratio = orpo_terms(chosen, rejected)
    assert sft.item() == pytest.approx(0.5) and odds_ratio.item() == pytest.approx(-logsig(log_odds), rel=1e-9)
    # reference-free rewards are beta * policy log-probs
    assert c_rew.item() == pytest.approx(-0.05) and r_rew.item() == pytest.approx(-0.12)


def test_orpo_stable_near_zero_logp() -> None:
    # avg log-prob -1e-7: naive log1p(-exp(x)) loses all digits; log(1 - exp(-1e-7)) ~ log(1e-7)
    chosen = torch.tensor([-1e-7], dtype=torch.float32, requires_grad=True)
    losses, _, _ = preference_loss("orpo", chosen, torch.tensor([-2.0]), None, None, beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
    log_odds = (-1e-7 + 2.0) - (math.log(1e-7 - 0.5e-14) - math.log(1 - math.exp(-2.0)))
    assert losses.item() == pytest.approx(1e-7 + 0.1 * -logsig(log_odds), rel=1e-5)


def test_simpo_hand_value() -> None:
    # beta 2, gamma 0.5: z = 2 * (-0.5 - -1.2) - 0.5 = 0.9
    chosen, rejected = torch.tensor([-0.5], dtype=torch.float64), torch.tensor([-1.2], dtype=torch.float64)
    losses, c_rew, _ = preference_loss("simpo", chosen, rejected, None, None, beta=2.0, simpo_gamma=0.5)
    assert losses.item() == pytest.approx(-logsig(0.9), rel=1e-9)
    assert c_rew.item() == pytest.approx(-1.0)
    smoothed, _, _ = preference_loss("simpo", chosen, rejected, None, None, beta=2.0, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(-logsig(0.9) * 0.9 - logsig(-0.9) * 0.1, rel=1e-9)


def test_rewards_are_beta_times_log_ratio_and_detached() -> None:
    chosen = torch.tensor(CHOSEN, requires_grad=True)
    _, c_rew, r_rew = preference_loss(
        "sigmoid", chosen, torch.tensor(REJECTED), torch.tensor(REF_CHOSEN), torch.tensor(REF_REJECTED), beta=BETA
    )
    assert c_rew.tolist() == pytest.approx([0.1, -0.1]) and r_rew.tolist() == pytest.approx([-0.05, 0.1])
    assert not c_rew.requires_grad and not r_rew.requires_grad


@pytest.mark.parametrize("loss_type", sorted(set(LOSSES) - {"sigmoid", "orpo", "simpo"}))
def test_loss_differs_from_sigmoid(loss_type: str) -> None:
    # same inputs, same label smoothing (robust equals sigmoid only at label_smoothing 0)
    kwargs = {"label_smoothing": 0.1, "bco_delta": 0.02}
    sig_kwargs = {"label_smoothing": 0.1}
    got, ref = run(loss_type, **kwargs), run("sigmoid", **sig_kwargs)
    assert all(abs(a - b) > 1e-4 for a, b in zip(got, ref)), (loss_type, got, ref)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_gradients_flow_and_are_finite(loss_type: str) -> None:
    averaged = loss_type in NEEDS_AVERAGED_LOGPS
    scale = 0.1 if averaged else 1.0  # averaged log-probs live in (-inf, 0) near -1
    chosen = torch.tensor(CHOSEN, requires_grad=True)
    rejected = torch.tensor(REJECTED, requires_grad=True)
    refs = (None, None) if loss_type in REFERENCE_FREE else (torch.tensor(REF_CHOSEN), torch.tensor(REF_REJECTED))
    c, r = chosen * scale, rejected * scale
    losses, _, _ = preference_loss(loss_type, c, r, *refs, beta=BETA, bco_delta=0.02)
    assert losses.shape == (2,)
    losses.mean().backward()
    for grad in (chosen.grad, rejected.grad):
        assert grad is not None and torch.isfinite(grad).all()
    assert chosen.grad.abs().sum() > 0


def test_unknown_loss_type_lists_valid_ones() -> None:
    with pytest.raises(KllamaError, match="unknown pref_loss 'dpo'.*sigmoid.*simpo"):
        preference_loss("dpo", torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1)


def test_reference_losses_need_references() -> None:
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("sigmoid", torch.zeros(1), torch.zeros(1), None, None, beta=0.1)
    with pytest.raises(ValueError, match="bco_delta"):
        run("bco_pair")


def test_robust_rejects_label_smoothing_half() -> None:
    with pytest.raises(KllamaError, match="dpo_label_smoothing"):
        run("robust", label_smoothing=0.5)


def test_sft_term_sum_and_average() -> None:
    assert sft_term(torch.tensor([-6.0, -3.0]), torch.tensor([3, 0])).tolist() == [2.0, 3.0]  # 0 tokens -> 1
    assert sft_term(torch.tensor([-0.7])).tolist() == pytest.approx([0.7])


def test_bco_running_mean() -> None:
    batch = bco_batch_reward(torch.tensor([0.1, 0.3]), torch.tensor([-0.2, 0.2]))
    assert batch.item() == pytest.approx(0.1)
    running = RunningMean()
    assert running.update(batch) == pytest.approx(0.1)
    assert running.update(0.3) == pytest.approx(0.2)  # (0.1 + 0.3) / 2


def test_tables_are_consistent() -> None:
    assert REFERENCE_FREE <= set(LOSSES) and NEEDS_AVERAGED_LOGPS <= set(LOSSES)
    assert set(HAND) | {"orpo", "simpo"} == set(LOSSES)  # every loss has a hand-derived test


def test_lazy_reexport() -> None:
    import kllama

    assert kllama.preference_loss is preference_loss
