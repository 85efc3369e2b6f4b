"""actors.math.dpo_losses: every variant against numbers worked out by hand (plain `math`), plus closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from actors.math.dpo_losses import (
    REFERENCE_FREE_VARIANTS,
    VARIANTS,
    PreferenceLossOutput,
    dpo_reward_accuracy,
    preference_loss,
)

# Three hand-made pairs: summed response log-probs and response lengths.
PC = [-10.0, -20.0, -7.0]   # policy, chosen
PR = [-12.0, -18.0, -9.5]   # policy, rejected
RC = [-11.0, -19.0, -7.5]   # reference, chosen
RR = [-11.5, -19.5, -9.0]   # reference, rejected
LC = [4, 5, 2]
LR = [6, 3, 5]
# h = (PC − RC) − (PR − RR):  (1 + 0.5, −1 − 1.5, 0.5 + 0.5)
H = [1.5, -2.5, 1.0]


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def nls(x):
    """−log σ(x) = log(1 + e^{−x}), written with plain math."""
    return math.log1p(math.exp(-x))


def run(variant, **kw):
    return preference_loss(variant, t(PC), t(PR), t(RC), t(RR),
                           chosen_lengths=t(LC, torch.long), rejected_lengths=t(LR, torch.long), **kw)


def close(tensor, expected, tol=1e-6):
    assert tensor.shape == (len(expected),)
    assert tensor.tolist() == pytest.approx(expected, abs=tol)


def test_lists_of_variants():
    assert set(VARIANTS) == {"sigmoid", "cdpo", "ipo", "hinge", "robust", "simpo", "orpo", "reference_free"}
    assert set(REFERENCE_FREE_VARIANTS) == {"simpo", "orpo", "reference_free"}


# --- DPO -------------------------------------------------------------------------------------------
SIGMOID_EXPECTED = {
    0.1: [math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.25)), math.log1p(math.exp(-0.1))],
    0.5: [math.log1p(math.exp(-0.75)), math.log1p(math.exp(1.25)), math.log1p(math.exp(-0.5))],
    2.0: [math.log1p(math.exp(-3.0)), math.log1p(math.exp(5.0)), math.log1p(math.exp(-2.0))],
}


@pytest.mark.parametrize("beta", sorted(SIGMOID_EXPECTED))
def test_sigmoid_hand_values(beta):
    out = run("sigmoid", beta=beta)
    assert isinstance(out, PreferenceLossOutput)
    close(out.losses, SIGMOID_EXPECTED[beta])
    close(out.chosen_rewards, [beta * 1.0, beta * -1.0, beta * 0.5])      # β (PC − RC)
    close(out.rejected_rewards, [beta * -0.5, beta * 1.5, beta * -0.5])   # β (PR − RR)
    close(out.logits, H)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_sigmoid_decimal_literals():
    # −log σ(0.15) = log(1 + e^{−0.15}) = 0.62095705...
    # −log σ(−0.25) = 0.82593942...,  −log σ(0.1) = 0.64439666...
    close(run("sigmoid", beta=0.1).losses, [0.6209570478, 0.8259394199, 0.6443966601])


# --- conservative DPO ------------------------------------------------------------------------------
@pytest.mark.parametrize("beta, eps, expected", [
    (0.1, 0.1, [0.9 * nls(0.15) + 0.1 * nls(-0.15), 0.9 * nls(-0.25) + 0.1 * nls(0.25),
                0.9 * nls(0.1) + 0.1 * nls(-0.1)]),
    (0.5, 0.25, [0.75 * nls(0.75) + 0.25 * nls(-0.75), 0.75 * nls(-1.25) + 0.25 * nls(1.25),
                 0.75 * nls(0.5) + 0.25 * nls(-0.5)]),
    (2.0, 0.4, [0.6 * nls(3.0) + 0.4 * nls(-3.0), 0.6 * nls(-5.0) + 0.4 * nls(5.0), 0.6 * nls(2.0) + 0.4 * nls(-2.0)]),
])
def test_cdpo_hand_values(beta, eps, expected):
    close(run("cdpo", beta=beta, label_smoothing=eps).losses, expected)


def test_cdpo_half_smoothing_is_symmetric():
    # ε = 0.5: ½(−log σ(x) − log σ(−x)) = ½ (log(1+e^{−x}) + log(1+e^{x})), even in h
    out = run("cdpo", beta=1.0, label_smoothing=0.5)
    close(out.losses, [0.5 * (nls(h) + nls(-h)) for h in H])


# --- robust DPO ------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta, eps, expected", [
    (0.1, 0.1, [(0.9 * nls(0.15) - 0.1 * nls(-0.15)) / 0.8, (0.9 * nls(-0.25) - 0.1 * nls(0.25)) / 0.8,
                (0.9 * nls(0.1) - 0.1 * nls(-0.1)) / 0.8]),
    (0.5, 0.25, [(0.75 * nls(0.75) - 0.25 * nls(-0.75)) / 0.5, (0.75 * nls(-1.25) - 0.25 * nls(1.25)) / 0.5,
                 (0.75 * nls(0.5) - 0.25 * nls(-0.5)) / 0.5]),
    (2.0, 0.4, [(0.6 * nls(3.0) - 0.4 * nls(-3.0)) / 0.2, (0.6 * nls(-5.0) - 0.4 * nls(5.0)) / 0.2,
                (0.6 * nls(2.0) - 0.4 * nls(-2.0)) / 0.2]),
])
def test_robust_hand_values(beta, eps, expected):
    close(run("robust", beta=beta, label_smoothing=eps).losses, expected)


def test_robust_is_unbiased_under_label_noise():
    """Chowdhury et al.: E over flips of the robust loss equals the clean DPO loss.
    With prob 1−ε we see (w, l), with prob ε the flipped pair (h → −h)."""
    eps, beta = 0.2, 0.7
    clean = run("sigmoid", beta=beta).losses
    seen = run("robust", beta=beta, label_smoothing=eps).losses
    flipped = preference_loss("robust", t(PR), t(PC), t(RR), t(RC), beta=beta, label_smoothing=eps).losses
    assert torch.allclose((1 - eps) * seen + eps * flipped, clean, atol=1e-12)


# --- hinge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta, expected", [
    (0.1, [1 - 0.15, 1 + 0.25, 1 - 0.1]),
    (0.5, [1 - 0.75, 1 + 1.25, 1 - 0.5]),
    (2.0, [0.0, 1 + 5.0, 0.0]),  # 1 − 3 and 1 − 2 are negative: hinge is 0
])
def test_hinge_hand_values(beta, expected):
    close(run("hinge", beta=beta).losses, expected)


# --- IPO -------------------------------------------------------------------------------------------
# h_avg = (PC − RC)/LC − (PR − RR)/LR:  1/4 + 0.5/6 = 1/3,  −1/5 − 1.5/3 = −0.7,  0.5/2 + 0.5/5 = 0.35
H_AVG = [1 / 3, -0.7, 0.35]


@pytest.mark.parametrize("beta, expected", [
    (0.1, [(1 / 3 - 5.0) ** 2, (-0.7 - 5.0) ** 2, (0.35 - 5.0) ** 2]),
    (0.5, [(1 / 3 - 1.0) ** 2, (-0.7 - 1.0) ** 2, (0.35 - 1.0) ** 2]),
    (2.0, [(1 / 3 - 0.25) ** 2, (-0.7 - 0.25) ** 2, (0.35 - 0.25) ** 2]),
])
def test_ipo_hand_values(beta, expected):
    out = run("ipo", beta=beta)
    close(out.losses, expected)
    close(out.logits, H_AVG)
    # rewards: DPO's summed-log-prob implicit rewards
    close(out.chosen_rewards, [beta * 1.0, beta * -1.0, beta * 0.5])
    close(out.rejected_rewards, [beta * -0.5, beta * 1.5, beta * -0.5])


def test_ipo_decimal_literal():
    # β = 0.1: (1/3 − 5)² = (−14/3)² = 196/9 = 21.777777...
    assert float(run("ipo", beta=0.1).losses[0]) == pytest.approx(21.7777777778, abs=1e-6)


# --- SimPO -----------------------------------------------------------------------------------------
# ȳ_w = PC/LC = (−2.5, −4, −3.5);  ȳ_l = PR/LR = (−2, −6, −1.9)
@pytest.mark.parametrize("beta, gamma, expected", [
    (2.0, 0.5, [nls(-5.0 + 4.0 - 0.5), nls(-8.0 + 12.0 - 0.5), nls(-7.0 + 3.8 - 0.5)]),
    (2.5, 1.0, [nls(-6.25 + 5.0 - 1.0), nls(-10.0 + 15.0 - 1.0), nls(-8.75 + 4.75 - 1.0)]),
    (10.0, 0.0, [nls(-25.0 + 20.0), nls(-40.0 + 60.0), nls(-35.0 + 19.0)]),
])
def test_simpo_hand_values(beta, gamma, expected):
    out = preference_loss("simpo", t(PC), t(PR), chosen_lengths=t(LC), rejected_lengths=t(LR),
                          beta=beta, simpo_gamma=gamma)
    close(out.losses, expected)
    close(out.chosen_rewards, [beta * -2.5, beta * -4.0, beta * -3.5])
    close(out.rejected_rewards, [beta * -2.0, beta * -6.0, beta * -1.9])


def test_simpo_gamma_is_the_margin_after_beta():
    # TRL's parameterisation −log σ(β(ȳ_w − ȳ_l − g)) equals ours with γ = β·g
    beta, trl_gamma = 2.0, 0.25
    ours = preference_loss("simpo", t(PC), t(PR), chosen_lengths=t(LC), rejected_lengths=t(LR),
                           beta=beta, simpo_gamma=beta * trl_gamma).losses
    close(ours, [nls(beta * (-2.5 + 2.0 - trl_gamma)), nls(beta * (-4.0 + 6.0 - trl_gamma)),
                 nls(beta * (-3.5 + 1.9 - trl_gamma))])


def test_simpo_ignores_reference():
    with_ref = preference_loss("simpo", t(PC), t(PR), t(RC), t(RR), chosen_lengths=t(LC), rejected_lengths=t(LR))
    without = preference_loss("simpo", t(PC), t(PR), chosen_lengths=t(LC), rejected_lengths=t(LR))
    assert torch.equal(with_ref.losses, without.losses)


# --- ORPO ------------------------------------------------------------------------------------------
# averages: ȳ_w = (−1.2/4, −0.6/2, −0.1/1) = (−0.3, −0.3, −0.1)
#           ȳ_l = (−2.7/3, −0.9/1, −4/2) = (−0.9, −0.9, −2)
OPC, OLC, OPR, OLR = [-1.2, -0.6, -0.1], [4, 2, 1], [-2.7, -0.9, -4.0], [3, 1, 2]


def log_odds(a):
    return a - math.log(1 - math.exp(a))


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0])
def test_orpo_hand_values(lam):
    out = preference_loss("orpo", t(OPC), t(OPR), chosen_lengths=t(OLC), rejected_lengths=t(OLR), orpo_lambda=lam)
    expected = [
        0.3 + lam * nls(log_odds(-0.3) - log_odds(-0.9)),
        0.3 + lam * nls(log_odds(-0.3) - log_odds(-0.9)),
        0.1 + lam * nls(log_odds(-0.1) - log_odds(-2.0)),
    ]
    close(out.losses, expected)
    close(out.logits, [log_odds(-0.3) - log_odds(-0.9), log_odds(-0.3) - log_odds(-0.9),
                       log_odds(-0.1) - log_odds(-2.0)])
    close(out.chosen_rewards, [0.1 * -0.3, 0.1 * -0.3, 0.1 * -0.1])   # β ȳ_w with β = 0.1 (default)
    close(out.rejected_rewards, [0.1 * -0.9, 0.1 * -0.9, 0.1 * -2.0])


def test_orpo_log_odds_decimal_literal():
    # log odds(−0.3) = −0.3 − log(1 − e^{−0.3}) = −0.3 + 1.35022561... = 1.05022561...
    # log odds(−0.9) = −0.9 − log(1 − e^{−0.9}) = −0.9 + 0.52183544... = −0.37816456...
    assert log_odds(-0.3) == pytest.approx(1.0502256128, abs=1e-9)
    assert log_odds(-0.9) == pytest.approx(-0.3781645571, abs=1e-9)
    out = preference_loss("orpo", t(OPC[:1]), t(OPR[:1]), chosen_lengths=t(OLC[:1]), rejected_lengths=t(OLR[:1]))
    assert float(out.logits[0]) == pytest.approx(log_odds(-0.3) - log_odds(-0.9), abs=1e-9)


def test_orpo_explicit_nll_replaces_the_default():
    base = preference_loss("orpo", t(OPC), t(OPR), chosen_lengths=t(OLC), rejected_lengths=t(OLR), orpo_lambda=0.5)
    nll = t([0.7, 0.2, 1.5])
    out = preference_loss("orpo", t(OPC), t(OPR), chosen_lengths=t(OLC), rejected_lengths=t(OLR), orpo_lambda=0.5,
                          chosen_nll=nll)
    close(out.losses - base.losses, [0.7 - 0.3, 0.2 - 0.3, 1.5 - 0.1])


def test_orpo_is_stable_at_extreme_probabilities():
    # ȳ near 0 (P → 1) and very negative (P → 0): log(1 − e^a) computed as log(−expm1(a)) / log1p(−e^a)
    a, b = -1e-6, -50.0
    pc = t([a]).requires_grad_()
    out = preference_loss("orpo", pc, t([b]), chosen_lengths=t([1]), rejected_lengths=t([1]), orpo_lambda=1.0)
    expected_odds = (a - math.log(-math.expm1(a))) - (b - math.log1p(-math.exp(b)))
    assert float(out.logits[0]) == pytest.approx(expected_odds, rel=1e-9)
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all()
    # P = 1 exactly (ȳ = 0): finite thanks to the clamp to −eps, in float32 too
    for dtype in (torch.float32, torch.float64):
        z = torch.zeros(2, dtype=dtype, requires_grad=True)
        o = preference_loss("orpo", z, torch.tensor([-1.0, -3.0], dtype=dtype),
                            chosen_lengths=torch.tensor([3, 3]), rejected_lengths=torch.tensor([3, 3]))
        o.losses.sum().backward()
        assert torch.isfinite(o.losses).all() and torch.isfinite(z.grad).all()


# --- reference-free DPO ----------------------------------------------------------------------------
@pytest.mark.parametrize("beta, expected", [
    (0.1, [nls(0.1 * 2.0), nls(0.1 * -2.0), nls(0.1 * 2.5)]),   # PC − PR = (2, −2, 2.5)
    (1.0, [nls(2.0), nls(-2.0), nls(2.5)]),
])
def test_reference_free_hand_values(beta, expected):
    out = preference_loss("reference_free", t(PC), t(PR), beta=beta)
    close(out.losses, expected)
    close(out.chosen_rewards, [beta * -10.0, beta * -20.0, beta * -7.0])
    close(out.rejected_rewards, [beta * -12.0, beta * -18.0, beta * -9.5])


def test_reference_free_equals_dpo_with_zero_reference():
    zeros = torch.zeros(3, dtype=torch.float64)
    for beta in (0.1, 0.3, 4.0):
        free = preference_loss("reference_free", t(PC), t(PR), beta=beta)
        dpo = preference_loss("sigmoid", t(PC), t(PR), zeros, zeros, beta=beta)
        assert torch.allclose(free.losses, dpo.losses, atol=1e-12)
        assert torch.allclose(free.chosen_rewards, dpo.chosen_rewards, atol=1e-12)


# --- closed forms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.1, 0.7, 3.0])
def test_dpo_gradient_matches_the_papers_closed_form(beta):
    """Rafailov et al. (§5.1) gradient: ∂L/∂log π(y_w) = −β σ(r̂_l − r̂_w), ∂L/∂log π(y_l) = +β σ(r̂_l − r̂_w)."""
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    out = preference_loss("sigmoid", pc, pr, t(RC), t(RR), beta=beta)
    out.losses.sum().backward()
    weight = torch.sigmoid(out.rejected_rewards - out.chosen_rewards)
    assert torch.allclose(pc.grad, -beta * weight, atol=1e-12)
    assert torch.allclose(pr.grad, beta * weight, atol=1e-12)
    # by hand: σ(r̂_l − r̂_w) = σ(−β h) = 1/(1 + e^{β h})
    close(pc.grad, [-beta / (1 + math.exp(beta * h)) for h in H], tol=1e-9)
    close(pr.grad, [beta / (1 + math.exp(beta * h)) for h in H], tol=1e-9)


def test_cdpo_gradient_closed_form():
    """∂L/∂h = β[−(1−ε) σ(−β h) + ε σ(β h)]."""
    beta, eps = 0.5, 0.2
    pc = t(PC).requires_grad_()
    run_out = preference_loss("cdpo", pc, t(PR), t(RC), t(RR), beta=beta, label_smoothing=eps)
    run_out.losses.sum().backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    close(pc.grad, [beta * (-(1 - eps) * sig(-beta * h) + eps * sig(beta * h)) for h in H], tol=1e-9)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    same, other = t([-5.0, -7.0, -0.25]), t([-6.0, -4.0, -30.0])
    for beta in (0.01, 0.1, 5.0):
        out = preference_loss("sigmoid", same, other, same, other, beta=beta)
        close(out.losses, [math.log(2)] * 3, tol=1e-12)
        assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0


def test_large_beta_limits():
    zero = t([0.0, 0.0])
    chosen, rejected = t([-1.0, -2.0]), t([-3.0, -2.5])   # h = (2, 0.5) with a zero reference
    for beta in (50.0, 200.0):
        win = preference_loss("sigmoid", chosen, rejected, zero, zero, beta=beta).losses
        lose = preference_loss("sigmoid", rejected, chosen, zero, zero, beta=beta).losses  # h = (−2, −0.5)
        assert float(win.max()) < math.exp(-0.5 * beta) * 1.01   # −log σ(x) ≈ e^{−x} → 0
        # −log σ(−x) = x + log(1 + e^{−x}) ~ β|h|
        close(lose, [beta * 2.0 + math.log1p(math.exp(-beta * 2.0)), beta * 0.5 + math.log1p(math.exp(-beta * 0.5))],
              tol=1e-9)
        assert float(lose[0]) / (beta * 2.0) == pytest.approx(1.0, rel=1e-6)


def test_small_beta_gives_log2():
    out = run("sigmoid", beta=1e-8)
    close(out.losses, [math.log(2)] * 3, tol=1e-7)


def test_zero_smoothing_reduces_to_dpo():
    for beta in (0.1, 0.5, 2.0):
        dpo = run("sigmoid", beta=beta).losses
        assert torch.allclose(run("cdpo", beta=beta, label_smoothing=0.0).losses, dpo, atol=1e-12)
        assert torch.allclose(run("robust", beta=beta, label_smoothing=0.0).losses, dpo, atol=1e-12)


def test_float32_batch_and_every_variant_runs():
    for variant in VARIANTS:
        kw = dict(chosen_lengths=torch.tensor(OLC), rejected_lengths=torch.tensor(OLR))
        out = preference_loss(variant, torch.tensor(OPC), torch.tensor(OPR), torch.tensor(OPC) + 0.1,
                              torch.tensor(OPR) - 0.1, label_smoothing=0.1, **kw)
        assert out.losses.dtype == torch.float32 and out.losses.shape == (3,)
        assert torch.isfinite(out.losses).all()


def test_reward_accuracy():
    assert float(dpo_reward_accuracy(t([1.0, 0.0, 2.0, 1.0]), t([0.5, 0.5, 2.0, -1.0]))) == pytest.approx(0.5)
    out = run("sigmoid", beta=0.1)   # h = (1.5, −2.5, 1.0): pairs 0 and 2 are ranked right
    assert float(dpo_reward_accuracy(out.chosen_rewards, out.rejected_rewards)) == pytest.approx(2 / 3)


# --- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["sigmoid", "cdpo", "ipo", "hinge", "robust"])
def test_missing_reference_raises(variant):
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(variant, t(PC), t(PR), chosen_lengths=t(LC), rejected_lengths=t(LR))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(variant, t(PC), t(PR), t(RC), None, chosen_lengths=t(LC), rejected_lengths=t(LR))


@pytest.mark.parametrize("variant", ["ipo", "simpo", "orpo"])
def test_missing_lengths_raise(variant):
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        preference_loss(variant, t(PC), t(PR), t(RC), t(RR))
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        preference_loss(variant, t(PC), t(PR), t(RC), t(RR), chosen_lengths=t(LC))


def test_other_errors():
    with pytest.raises(ValueError, match="beta must be > 0"):
        run("sigmoid", beta=0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        run("simpo", beta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        run("robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        run("cdpo", label_smoothing=-0.1)
    with pytest.raises(ValueError, match="unknown DPO variant"):
        run("kto")
    with pytest.raises(ValueError, match="shape"):
        preference_loss("sigmoid", t(PC), t(PR[:2]), t(RC), t(RR))
