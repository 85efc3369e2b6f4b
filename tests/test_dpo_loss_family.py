"""Every DPO-family loss against values computed by hand with plain `math`, and against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from actors.dpo_losses import preference_loss

# Two pairs, hand-made: summed log-probs and response lengths.
PC = [-10.0, -20.0]   # policy, chosen
PR = [-12.0, -18.0]   # policy, rejected
RC = [-11.0, -19.0]   # reference, chosen
RR = [-11.5, -19.5]   # reference, rejected
LC = [4.0, 5.0]
LR = [6.0, 3.0]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def h(i):
    return (PC[i] - RC[i]) - (PR[i] - RR[i])  # pair 0: 1 + 0.5 = 1.5; pair 1: -1 - 1.5 = -2.5


def run(variant, **kw):
    return preference_loss(variant, t(PC), t(PR), t(RC), t(RR), chosen_lengths=t(LC), rejected_lengths=t(LR), **kw)


def test_hand_values_of_h():
    assert [h(0), h(1)] == [1.5, -2.5]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_dpo(beta):
    out = run("sigmoid", beta=beta)
    expected = [-logsig(beta * h(i)) for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * (PC[i] - RC[i]) for i in range(2)], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([beta * (PR[i] - RR[i]) for i in range(2)], abs=1e-6)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.1), (0.5, 0.25), (1.0, 0.4)])
def test_conservative_dpo(beta, eps):
    out = run("cdpo", beta=beta, label_smoothing=eps)
    expected = [-(1 - eps) * logsig(beta * h(i)) - eps * logsig(-beta * h(i)) for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.1), (0.5, 0.25), (1.0, 0.4)])
def test_robust_dpo(beta, eps):
    out = run("robust", beta=beta, label_smoothing=eps)
    expected = [((1 - eps) * -logsig(beta * h(i)) - eps * -logsig(-beta * h(i))) / (1 - 2 * eps) for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_hinge(beta):
    out = run("hinge", beta=beta)
    assert out.losses.tolist() == pytest.approx([max(0.0, 1 - beta * h(i)) for i in range(2)], abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_uses_per_token_averages(beta):
    out = run("ipo", beta=beta)
    expected = []
    for i in range(2):
        h_avg = (PC[i] / LC[i] - RC[i] / LC[i]) - (PR[i] / LR[i] - RR[i] / LR[i])
        expected.append((h_avg - 1 / (2 * beta)) ** 2)
    # pair 0 by hand: (-2.5 + 2.75) - (-2 + 1.9166667) = 0.25 + 0.0833333 = 0.3333333
    assert (PC[0] / LC[0] - RC[0] / LC[0]) - (PR[0] / LR[0] - RR[0] / LR[0]) == pytest.approx(1 / 3)
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.0), (10.0, 0.0)])
def test_simpo(beta, gamma):
    out = preference_loss("simpo", t(PC), t(PR), chosen_lengths=t(LC), rejected_lengths=t(LR), beta=beta, simpo_gamma=gamma)
    expected = [-logsig(beta * PC[i] / LC[i] - beta * PR[i] / LR[i] - gamma) for i in range(2)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * PC[i] / LC[i] for i in range(2)], abs=1e-6)


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0])
def test_orpo(lam):
    # ORPO needs log P < 0 with P not tiny, so use per-token averages like -0.3 / -0.9.
    pc, pr, lc, lr = [-1.2, -0.6], [-2.7, -0.9], [4.0, 2.0], [3.0, 1.0]
    out = preference_loss("orpo", t(pc), t(pr), chosen_lengths=t(lc), rejected_lengths=t(lr), orpo_lambda=lam)
    expected = []
    for i in range(2):
        a, b = pc[i] / lc[i], pr[i] / lr[i]
        log_odds = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
        expected.append(-a - lam * logsig(log_odds))
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    # an explicit NLL term replaces -avg log p
    nll = t([0.7, 0.2])
    out2 = preference_loss("orpo", t(pc), t(pr), chosen_lengths=t(lc), rejected_lengths=t(lr), orpo_lambda=lam, chosen_nll=nll)
    assert (out2.losses - out.losses).tolist() == pytest.approx([0.7 - 0.3, 0.2 - 0.3], abs=1e-6)


def test_reference_free_equals_dpo_with_zero_reference():
    out = preference_loss("reference_free", t(PC), t(PR), beta=0.3)
    dpo = preference_loss("sigmoid", t(PC), t(PR), t([0.0, 0.0]), t([0.0, 0.0]), beta=0.3)
    assert torch.allclose(out.losses, dpo.losses)
    assert out.losses.tolist() == pytest.approx([-logsig(0.3 * (PC[i] - PR[i])) for i in range(2)], abs=1e-6)


def test_zero_smoothing_reduces_to_dpo():
    dpo = run("sigmoid", beta=0.5)
    assert torch.allclose(run("cdpo", beta=0.5, label_smoothing=0.0).losses, dpo.losses)
    assert torch.allclose(run("robust", beta=0.5, label_smoothing=0.0).losses, dpo.losses)


def test_gradient_matches_the_papers_closed_form():
    """d loss / d log π(y_w) = −β σ(r̂_l − r̂_w);  d loss / d log π(y_l) = +β σ(r̂_l − r̂_w)."""
    beta = 0.7
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    out = preference_loss("sigmoid", pc, pr, t(RC), t(RR), beta=beta)
    out.losses.sum().backward()
    weight = torch.sigmoid(out.rejected_rewards - out.chosen_rewards)
    assert torch.allclose(pc.grad, -beta * weight, atol=1e-12)
    assert torch.allclose(pr.grad, beta * weight, atol=1e-12)
    # hand value, pair 0: β σ(−β·1.5)
    assert float(pc.grad[0]) == pytest.approx(-beta / (1 + math.exp(beta * 1.5)), abs=1e-9)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    same = t([-5.0, -7.0])
    other = t([-6.0, -4.0])
    for beta in (0.01, 0.1, 5.0):
        out = preference_loss("sigmoid", same, other, same, other, beta=beta)
        assert out.losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-9)
        assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0


def test_large_and_small_beta_limits():
    positive, negative = t([-1.0]), t([-3.0])  # h = +2 with zero reference
    zero = t([0.0])
    win = preference_loss("sigmoid", positive, negative, zero, zero, beta=50.0).losses
    lose = preference_loss("sigmoid", negative, positive, zero, zero, beta=50.0).losses
    tiny = preference_loss("sigmoid", positive, negative, zero, zero, beta=1e-6).losses
    assert float(win) < 1e-12                       # confident and right: no loss
    assert float(lose) == pytest.approx(50.0 * 2, rel=1e-6)  # confident and wrong: ~β|h|
    assert float(tiny) == pytest.approx(math.log(2), abs=1e-5)  # β → 0: log 2 whatever h


def test_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss("sigmoid", t(PC), t(PR))
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss("simpo", t(PC), t(PR))
    with pytest.raises(ValueError, match="beta must be > 0"):
        run("sigmoid", beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        run("robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="unknown DPO variant"):
        run("kto")
