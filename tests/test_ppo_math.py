"""actors.math.ppo_math: hand-computed values, reference loops and closed forms for the PPO / RLHF estimators."""

from __future__ import annotations

import math

import pytest
import torch

from actors.math.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    best_of_n_kl,
    bradley_terry_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_estimate,
    kl_penalized_rewards,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def approx_flat(rows, **kw):
    """pytest.approx for a list of rows, compared against ``tensor.flatten().tolist()``."""
    return pytest.approx([float(v) for row in rows for v in row], **kw)


# --- masked statistics -----------------------------------------------------------------------------
X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
M = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]   # selects 1, 2, 4; the last row is empty


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, F64, torch.long])
def test_masked_sum_mean_var_hand_values(mask_dtype):
    x, m = t(X), torch.tensor(M).to(mask_dtype)
    assert float(masked_sum(x, m)) == pytest.approx(7.0)
    assert masked_sum(x, m, dim=1).tolist() == pytest.approx([3.0, 4.0, 0.0])
    assert float(masked_mean(x, m)) == pytest.approx(7 / 3, abs=1e-12)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 4.0, 0.0])   # empty row → 0
    assert masked_mean(x, m, dim=0).tolist() == pytest.approx([2.5, 2.0, 0.0])
    # deviations from 7/3: −4/3, −1/3, 5/3 → Σ² = 42/9
    assert float(masked_var(x, m, unbiased=False)) == pytest.approx(42 / 27, abs=1e-12)
    assert float(masked_var(x, m, unbiased=True)) == pytest.approx(42 / 18, abs=1e-12)


def test_masked_stats_ignore_garbage_and_have_finite_gradients():
    x = t([[1.0, float("nan")], [float("inf"), float("nan")]]).requires_grad_()
    m = t([[1, 0], [0, 0]])
    mean = masked_mean(x, m, dim=1)
    assert mean.tolist() == [1.0, 0.0]
    mean.sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_masked_var_needs_entries():
    with pytest.raises(ValueError):
        masked_var(t([1.0, 2.0]), t([0, 0]))
    with pytest.raises(ValueError):
        masked_var(t([1.0, 2.0]), t([1, 0]), unbiased=True)
    assert float(masked_var(t([1.0, 2.0]), t([1, 0]), unbiased=False)) == 0.0


def test_whitening_mean_zero_var_one_on_masked_entries_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=F64) * 3.0 + 5.0
    lengths = [9, 4, 1, 7, 0, 2]
    mask = torch.zeros(6, 9, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    w = masked_whiten(x, mask)
    selected = w[mask]
    assert float(selected.mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(selected.var(unbiased=True)) == pytest.approx(1.0, abs=1e-6)
    assert float(w[~mask].abs().max()) == 0.0        # outside the mask: 0
    # unmasked entries do not influence anything
    x2 = x.clone()
    x2[~mask] = 1e6
    assert torch.allclose(masked_whiten(x2, mask), w, atol=1e-12)
    # same as whitening the selected entries by hand
    sel = x[mask]
    assert torch.allclose(selected, (sel - sel.mean()) / torch.sqrt(sel.var(unbiased=True) + 1e-8), atol=1e-12)
    # shift_mean=False keeps the mean, rescales the spread
    w_keep = masked_whiten(x, mask, shift_mean=False)[mask]
    assert float(w_keep.mean()) == pytest.approx(float(sel.mean()), abs=1e-9)
    assert float(w_keep.var()) == pytest.approx(1.0, abs=1e-6)


def test_whiten_hand_values():
    # entries 1, 2, 3 (4 is masked): mean 2, unbiased var 1 → (−1, 0, 1) (eps = 0 for exactness)
    out = masked_whiten(t([[1.0, 2.0], [3.0, 4.0]]), t([[1, 1], [1, 0]]), eps=0.0)
    assert out.flatten().tolist() == approx_flat([[-1.0, 0.0], [1.0, 0.0]], abs=1e-12)


# --- KL estimators ---------------------------------------------------------------------------------
def test_kl_estimators_hand_values():
    logp, ref = t([-1.0, -2.0, -0.5]), t([-1.5, -1.0, -0.5])   # log r = (0.5, −1, 0)
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0], abs=1e-12)
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5, 0.0], abs=1e-12)
    # k3 = e^{−log r} − 1 + log r:  e^{−0.5} − 0.5 = 0.10653066,  e^{1} − 2 = 0.71828183,  0
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx(
        [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0], abs=1e-12)
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([0.1065306597, 0.7182818285, 0.0], abs=1e-9)
    assert kl_estimate(logp, ref, "abs").tolist() == pytest.approx([0.5, 1.0, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


@pytest.mark.parametrize("p, q", [
    ([0.5, 0.3, 0.2], [0.2, 0.5, 0.3]),
    ([0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]),
    ([0.4, 0.35, 0.25], [0.38, 0.37, 0.25]),
])
def test_kl_estimators_by_sampling(p, q):
    """Tokens sampled from π = p; KL(p ‖ q) = Σ p log(p/q). k1 and k3 are unbiased; k2's expectation is
    Σ p ½ (log p/q)² (biased, but ≥ 0 and close for nearby distributions)."""
    exact_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    exact_k2 = sum(pi * 0.5 * math.log(pi / qi) ** 2 for pi, qi in zip(p, q))
    exact_k3 = sum(pi * (qi / pi - 1 - math.log(qi / pi)) for pi, qi in zip(p, q))
    assert exact_k3 == pytest.approx(exact_kl, abs=1e-12)   # Σ q − 1 = 0
    g = torch.Generator().manual_seed(1234)
    n = 200_000
    idx = torch.multinomial(t(p), n, replacement=True, generator=g)
    logp, ref = torch.log(t(p))[idx], torch.log(t(q))[idx]
    for kind, expected in (("k1", exact_kl), ("k2", exact_k2), ("k3", exact_kl)):
        est = kl_estimate(logp, ref, kind)
        se = float(est.std()) / math.sqrt(n)
        assert abs(float(est.mean()) - expected) < 4 * se + 1e-12, kind
    assert float(kl_estimate(logp, ref, "k3").min()) >= 0.0
    assert float(kl_estimate(logp, ref, "k2").min()) >= 0.0
    # k3 has lower variance than k1 here (Schulman's point)
    assert float(kl_estimate(logp, ref, "k3").var()) < float(kl_estimate(logp, ref, "k1").var())


def test_k3_is_nonnegative_everywhere():
    log_r = torch.linspace(-20, 20, 4001, dtype=F64)
    assert float(kl_estimate(log_r, torch.zeros_like(log_r), "k3").min()) >= 0.0


# --- KL-penalised rewards --------------------------------------------------------------------------
def test_kl_penalized_rewards_puts_the_score_on_the_last_valid_token():
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    logp = t([[-1.0, -2.0, -0.5, -1.0], [-0.2, -0.3, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0], [-1.0, 7.0, 7.0, 7.0]])
    ref = t([[-1.5, -1.0, -0.5, -2.0], [-0.4, -0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.5, 0.0, 0.0, 0.0]])
    scores = t([1.0, -2.0, 5.0, 0.25])
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # k1 = logp − ref inside the mask, 0 outside
    assert kl.flatten().tolist() == approx_flat(
        [[0.5, -1.0, 0.0, 1.0], [0.2, -0.2, 0.0, 0.0], [0.0] * 4, [-0.5, 0, 0, 0]], abs=1e-12)
    assert rewards.flatten().tolist() == approx_flat([
        [-0.05, 0.1, 0.0, -0.1 + 1.0],
        [-0.02, 0.02 - 2.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],              # nothing valid: no score, no penalty
        [0.05 + 0.25, 0.0, 0.0, 0.0],
    ], abs=1e-12)
    assert last_token_index(mask).tolist() == [3, 1, -1, 0]


def test_kl_penalized_rewards_clip_and_k3():
    mask = t([[1, 1, 0]])
    logp, ref = t([[-1.0, -2.0, 0.0]]), t([[-1.5, -1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(t([-3.0]), logp, ref, mask, kl_coef=0.5, kind="k3", clip_score=1.5)
    k3 = [math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0]
    assert kl.flatten().tolist() == approx_flat([[k3[0], k3[1], 0.0]], abs=1e-12)
    assert rewards.flatten().tolist() == approx_flat([[-0.5 * k3[0], -0.5 * k3[1] - 1.5, 0.0]], abs=1e-12)
    # the sum of rewards of a row = score − β Σ KL (the RLHF objective per sequence)
    assert float(rewards.sum()) == pytest.approx(-1.5 - 0.5 * sum(k3), abs=1e-12)


# --- GAE -------------------------------------------------------------------------------------------
def gae_reference(rewards, values, length, gamma, lam):
    """Plain Python reverse loop over one row's valid tokens, bootstrap 0 at the end."""
    adv = [0.0] * len(rewards)
    last = 0.0
    for step in reversed(range(length)):
        next_value = values[step + 1] if step + 1 < length else 0.0
        delta = rewards[step] + gamma * next_value - values[step]
        last = delta + gamma * lam * last
        adv[step] = last
    returns = [adv[i] + values[i] if i < length else 0.0 for i in range(len(rewards))]
    return adv, returns


def test_gae_hand_values():
    # r = (0, 0, 1), V = (0.5, 0.6, 0.7), γ = 0.9, λ = 0.8 (γλ = 0.72):
    # δ2 = 1 − 0.7 = 0.3;  δ1 = 0.9·0.7 − 0.6 = 0.03;  δ0 = 0.9·0.6 − 0.5 = 0.04
    # A2 = 0.3;  A1 = 0.03 + 0.72·0.3 = 0.246;  A0 = 0.04 + 0.72·0.246 = 0.21712
    adv, ret = gae_advantages(t([[0.0, 0.0, 1.0, 0.0]]), t([[0.5, 0.6, 0.7, 3.0]]), t([[1, 1, 1, 0]]), 0.9, 0.8)
    assert adv.flatten().tolist() == approx_flat([[0.21712, 0.246, 0.3, 0.0]], abs=1e-12)
    assert ret.flatten().tolist() == approx_flat([[0.71712, 0.846, 1.0, 0.0]], abs=1e-12)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_a_per_row_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(7)
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64)
    lengths = [9, 4, 1, 0, 6, 8]
    mask = torch.zeros(B, T)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    # padding garbage must not leak in
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e3))
    values = torch.where(mask.bool(), values, torch.full_like(values, float("nan")))
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        exp_adv, exp_ret = gae_reference(rewards[row].tolist(), values[row].tolist(), n, gamma, lam)
        assert adv[row].tolist() == pytest.approx(exp_adv, abs=1e-10)
        assert ret[row].tolist() == pytest.approx(exp_ret, abs=1e-10)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_gae_closed_forms():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(2, 5, generator=g, dtype=F64), torch.randn(2, 5, generator=g, dtype=F64)
    mask = t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    # λ = 1, γ = 1: returns are the Monte-Carlo reward-to-go
    _, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    rtg = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
    assert torch.allclose(ret, rtg, atol=1e-12)
    # λ = 0: the advantage is the one-step TD error
    adv, _ = gae_advantages(rewards, values, mask, 0.9, 0.0)
    next_mask = torch.cat([mask[:, 1:], torch.zeros(2, 1)], 1)
    next_v = torch.cat([values[:, 1:], torch.zeros(2, 1, dtype=F64)], 1) * next_mask
    assert torch.allclose(adv, (rewards + 0.9 * next_v - values) * mask, atol=1e-12)


def test_gae_skips_holes_in_the_mask():
    """Tokens outside the mask are transparent: a row with holes equals the compacted row."""
    g = torch.Generator().manual_seed(11)
    rewards, values = torch.randn(1, 7, generator=g, dtype=F64), torch.randn(1, 7, generator=g, dtype=F64)
    mask = t([[0, 1, 1, 0, 1, 0, 0]])
    keep = mask[0].bool()
    adv, ret = gae_advantages(rewards, values, mask, 0.95, 0.9)
    exp_adv, exp_ret = gae_reference(rewards[0, keep].tolist(), values[0, keep].tolist(), 3, 0.95, 0.9)
    assert adv[0, keep].tolist() == pytest.approx(exp_adv, abs=1e-12)
    assert ret[0, keep].tolist() == pytest.approx(exp_ret, abs=1e-12)
    assert float(adv[0, ~keep].abs().max()) == 0.0


# --- KL controllers --------------------------------------------------------------------------------
def test_adaptive_kl_controller_hand_values():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 3: error 3/6 − 1 = −0.5, clipped to −0.2; mult = 1 − 0.2·256/10000 = 0.99488
    assert ctl.update(3.0, 256) == pytest.approx(0.099488, abs=1e-12)
    # KL 6.6: error 0.1 (inside the clip); mult = 1 + 0.1·512/10000 = 1.00512
    assert ctl.update(6.6, 512) == pytest.approx(0.09999737856, abs=1e-12)
    # KL 100: error 15.67 clipped to 0.2; mult = 1 + 0.2·1000/10000 = 1.02
    assert ctl.update(100.0, 1000) == pytest.approx(0.1019973261312, abs=1e-12)
    # KL on target: unchanged
    assert ctl.update(6.0, 5000) == pytest.approx(0.1019973261312, abs=1e-12)
    # checkpoint round trip
    state = ctl.state_dict()
    fresh = AdaptiveKLController(0.5, 1.0, 1.0)
    fresh.load_state_dict(state)
    assert (fresh.value, fresh.target, fresh.horizon) == (ctl.value, 6.0, 10000.0)
    assert fresh.update(0.0, 100) == pytest.approx(0.1019973261312 * (1 - 0.2 * 100 / 10000), abs=1e-12)
    # tensors are accepted as the measured KL
    assert AdaptiveKLController(0.2, 1.0, 10).update(torch.tensor(1.1), 10) == pytest.approx(0.2 * 1.1, abs=1e-7)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 1000) == 0.05 and ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# --- PPO losses ------------------------------------------------------------------------------------
# Five valid tokens (the last of row 1 is padding with garbage), ε = 0.2.
#   token  ratio  A     ρA     clip(ρ)A   min    clipped active?
#   0      1.5    1.0   1.5    1.2        1.2    yes
#   1      0.5   −2.0  −1.0   −1.6       −1.6    yes
#   2      1.1    0.5   0.55   0.55       0.55   no
#   3      0.6    1.0   0.6    0.8        0.6    no  (outside the range, but the unclipped term is smaller)
#   4      1.3    2.0   2.6    2.4        2.4    yes
RATIOS = [[1.5, 0.5, 1.1], [0.6, 1.3, math.exp(5.0)]]
ADV = [[1.0, -2.0, 0.5], [1.0, 2.0, 99.0]]
PPO_MASK = [[1, 1, 1], [1, 1, 0]]


def ppo_inputs():
    old = t([[-1.0, -2.0, -0.3], [-0.7, -1.1, -4.0]])
    logp = old + torch.log(t(RATIOS))
    return logp, old, t(ADV), t(PPO_MASK)


def test_policy_loss_hand_values():
    logp, old, adv, mask = ppo_inputs()
    loss, clipfrac, approx_kl = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert float(loss) == pytest.approx(-(1.2 - 1.6 + 0.55 + 0.6 + 2.4) / 5, abs=1e-9)   # −0.63
    assert float(loss) == pytest.approx(-0.63, abs=1e-9)
    assert float(clipfrac) == pytest.approx(3 / 5, abs=1e-12)
    # approx_kl: k3 of KL(π_old ‖ π) = mean(ρ − 1 − log ρ)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.6, 1.3)]
    assert float(approx_kl) == pytest.approx(sum(k3) / 5, abs=1e-9)
    assert float(approx_kl) == pytest.approx(0.0881666504, abs=1e-9)


def test_policy_loss_clip_higher():
    logp, old, adv, mask = ppo_inputs()
    # ε_low = 0.2, ε_high = 0.6: ratios 1.5 and 1.3 are inside [0.8, 1.6] now
    loss, clipfrac, _ = policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert float(loss) == pytest.approx(-(1.5 - 1.6 + 0.55 + 0.6 + 2.6) / 5, abs=1e-9)   # −0.73
    assert float(clipfrac) == pytest.approx(1 / 5, abs=1e-12)


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
    logp, old, adv, mask = ppo_inputs()
    logp.requires_grad_()
    loss, _, _ = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    # d/d logp of −ρA/5 is −ρA/5 where the unclipped branch is active, 0 where the clipped one is
    assert logp.grad.flatten().tolist() == approx_flat([[0.0, 0.0, -0.55 / 5], [-0.6 / 5, 0.0, 0.0]], abs=1e-9)


def test_policy_loss_on_policy_is_minus_mean_advantage():
    logp, _, adv, mask = ppo_inputs()
    loss, clipfrac, approx_kl = policy_loss(logp, logp.clone(), adv, mask, clip_eps=0.2)
    assert float(loss) == pytest.approx(-(1.0 - 2.0 + 0.5 + 1.0 + 2.0) / 5, abs=1e-12)
    assert float(clipfrac) == 0.0 and float(approx_kl) == 0.0


#   token  V_old  V     R      (V−R)²  V_clip  (V_clip−R)²  max    clipped active?
#   0      1.0    1.5   2.0    0.25    1.2     0.64         0.64   yes
#   1      1.0    1.5   1.0    0.25    1.2     0.04         0.25   no
#   2      0.0    0.1   1.0    0.81    0.1     0.81         0.81   no (equal)
#   3      0.0   −0.5   0.0    0.25   −0.2     0.04         0.25   no
#   4      0.0   −0.5  −1.0    0.25   −0.2     0.64         0.64   yes
def test_value_loss_hand_values():
    old = t([[1.0, 1.0, 0.0], [0.0, 0.0, 50.0]])
    values = t([[1.5, 1.5, 0.1], [-0.5, -0.5, -50.0]])
    returns = t([[2.0, 1.0, 1.0], [0.0, -1.0, 7.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, clip_range=0.2)
    assert float(loss) == pytest.approx(0.5 * (0.64 + 0.25 + 0.81 + 0.25 + 0.64) / 5, abs=1e-9)   # 0.259
    assert float(loss) == pytest.approx(0.259, abs=1e-9)
    assert float(clipfrac) == pytest.approx(2 / 5, abs=1e-12)
    unclipped, zero = value_loss(values, old, returns, mask, clip_range=None)
    assert float(unclipped) == pytest.approx(0.5 * (0.25 + 0.25 + 0.81 + 0.25 + 0.25) / 5, abs=1e-9)   # 0.181
    assert float(zero) == 0.0


# --- entropy, explained variance, reward-model loss, Best-of-N --------------------------------------
def test_entropy_from_logits():
    # p = (1/3, 2/3): H = −(1/3 log 1/3 + 2/3 log 2/3) = 0.63651417
    h_exp = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    logits = t([[[0.0, math.log(2.0)], [1000.0, 1000.0 + math.log(2.0)]],
                [[3.0, 3.0], [0.0, -float("inf")]]])
    ent = entropy_from_logits(logits)
    assert ent.shape == (2, 2)
    assert ent.flatten().tolist() == approx_flat([[h_exp, h_exp], [math.log(2), 0.0]], abs=1e-9)
    assert h_exp == pytest.approx(0.6365141683, abs=1e-9)
    uniform = entropy_from_logits(torch.zeros(3, 4, 50, dtype=F64))
    assert torch.allclose(uniform, torch.full((3, 4), math.log(50), dtype=F64))
    # equals −Σ p log p on random logits
    z = torch.randn(4, 6, 11, dtype=F64, generator=torch.Generator().manual_seed(5))
    p = torch.softmax(z, -1)
    assert torch.allclose(entropy_from_logits(z), -(p * torch.log(p)).sum(-1), atol=1e-12)
    banned = t([[0.0, -float("inf"), 0.0, math.log(2.0)]])   # p = (1/4, 0, 1/4, 1/2)
    assert float(entropy_from_logits(banned)) == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.5)), abs=1e-12)


def test_explained_variance_hand_values():
    # masked entries: R = (1, 3, 5, 3), V = (1, 2, 3, 3), R − V = (0, 1, 2, 0)
    # Var R = (4 + 0 + 4 + 0)/4 = 2;  Var(R − V): mean 0.75 → (0.5625 + 0.0625 + 1.5625 + 0.5625)/4 = 0.6875
    values = t([[1.0, 2.0, 3.0, 100.0], [3.0, 9.0, 9.0, 9.0]])
    returns = t([[1.0, 3.0, 5.0, -100.0], [3.0, -9.0, -9.0, -9.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert float(explained_variance(values, returns, mask)) == pytest.approx(1 - 0.6875 / 2, abs=1e-12)  # 0.65625
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(returns, 7.0), returns, mask)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(float(explained_variance(values, torch.ones_like(returns), mask)))


def test_bradley_terry_hand_values():
    chosen, rejected = t([2.0, 0.5, -1.0]), t([1.0, 1.5, -1.0])   # r_w − r_l = (1, −1, 0)
    loss, acc = bradley_terry_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log(2)) / 3
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    assert float(loss) == pytest.approx(0.7732235185, abs=1e-9)
    assert float(acc) == pytest.approx(1 / 3)                       # a tie is not a win
    loss_m, acc_m = bradley_terry_loss(chosen, rejected, margin=t([0.5, 0.0, 1.0]))   # (0.5, −1, −1)
    assert float(loss_m) == pytest.approx(
        (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1)) + math.log1p(math.exp(1))) / 3, abs=1e-12)
    assert float(acc_m) == pytest.approx(1 / 3)
    # gradient: ∂L/∂r_w = −σ(−d)/B
    c = chosen.clone().requires_grad_()
    bradley_terry_loss(c, rejected)[0].backward()
    assert c.grad.tolist() == pytest.approx([-1 / (1 + math.e) / 3, -1 / (1 + math.exp(-1)) / 3, -0.5 / 3], abs=1e-12)


def test_best_of_n_kl():
    assert float(best_of_n_kl(1)) == 0.0
    assert float(best_of_n_kl(2)) == pytest.approx(math.log(2) - 0.5, abs=1e-12)     # 0.19314718
    assert float(best_of_n_kl(4)) == pytest.approx(math.log(4) - 0.75, abs=1e-12)    # 0.63629436
    assert float(best_of_n_kl(2)) == pytest.approx(0.1931471806, abs=1e-9)
    assert float(best_of_n_kl(4)) == pytest.approx(0.6362943611, abs=1e-9)
    assert best_of_n_kl(torch.tensor([1, 2, 4])).tolist() == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    with pytest.raises(ValueError):
        best_of_n_kl(0)
