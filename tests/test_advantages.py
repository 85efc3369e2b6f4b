"""Exact tests of the critic-free estimators (actors/math/advantages.py) against hand-computed values.

Tolerance: inputs are float32 and each expected value is a handful of float32 operations on O(1) numbers
(a sum of ≤ 5 terms, one division, one sqrt), so each result is within a few ulp of the exact value;
float32's ulp at 1 is 1.19e-7, so rtol = atol = 1e-6 (≈ 8 ulp) holds with margin yet fails any wrong formula.
"""
from __future__ import annotations

import math

import pytest
import torch

from actors.math.advantages import (aggregate_token_loss, discounted_returns, dr_grpo_advantages,
                                    grpo_advantages, grpo_loss, reinforce_pp_advantages, rloo_advantages,
                                    sequence_advantages, to_tokens)

TOL = dict(rtol=1e-6, atol=1e-6)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_rloo_is_reward_minus_mean_of_the_others():
    # group 1: Σ = 12, baselines (12 − r)/3 = 11/3, 10/3, 3, 2; group 2: all equal
    adv = rloo_advantages(t([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5]), k=4)
    torch.testing.assert_close(adv, t([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]), **TOL)
    torch.testing.assert_close(adv.view(-1, 4).sum(1), t([0.0, 0.0]), **TOL)


def test_rloo_with_two_samples_is_the_pairwise_difference():
    torch.testing.assert_close(rloo_advantages(t([1.0, 3.0, -2.0, 5.0]), k=2), t([-2.0, 2.0, -7.0, 7.0]), **TOL)


def test_grpo_normalises_with_the_unbiased_group_std():
    # deviations from mean 3: −2, −1, 0, 3; unbiased var = (4 + 1 + 0 + 9)/3 = 14/3
    std = math.sqrt(14 / 3)
    rewards = t([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    adv = grpo_advantages(rewards, k=4, eps=0.0)
    torch.testing.assert_close(adv, t([-2 / std, -1 / std, 0.0, 3 / std, 0, 0, 0, 0]), **TOL)
    g = adv.view(-1, 4)[0]
    torch.testing.assert_close(g.mean(), t(0.0), **TOL)
    torch.testing.assert_close(g.std(unbiased=True), t(1.0), **TOL)
    # the default eps (TRL's 1e-4) is added to the std, not the variance
    torch.testing.assert_close(grpo_advantages(rewards, k=4)[:4], t([-2, -1, 0, 3]) / (std + 1e-4), **TOL)


def test_equal_rewards_give_zero_advantage_not_nan():
    # 0.1 is not exact in float32, so mean(r) − r can be an ulp off: the estimators must still return exactly 0
    rewards = t([0.1, 0.1, 0.1])
    for adv in (grpo_advantages(rewards, k=3, eps=0.0), grpo_advantages(rewards, k=3),
                rloo_advantages(rewards, k=3), dr_grpo_advantages(rewards, k=3)):
        assert torch.equal(adv, torch.zeros(3))


def test_dr_grpo_drops_the_std():
    torch.testing.assert_close(dr_grpo_advantages(t([1.0, 2.0, 3.0, 6.0]), k=4), t([-2.0, -1.0, 0.0, 3.0]), **TOL)


def test_dispatch_and_group_errors():
    r = t([1.0, 2.0, 3.0, 6.0])
    assert torch.equal(sequence_advantages("rloo", r, 4), rloo_advantages(r, 4))
    assert torch.equal(sequence_advantages("grpo", r, 4), grpo_advantages(r, 4))
    assert torch.equal(sequence_advantages("dr_grpo", r, 4), dr_grpo_advantages(r, 4))
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(r, 1)
    with pytest.raises(ValueError, match="not whole groups of k=3"):
        grpo_advantages(r, 3)
    with pytest.raises(ValueError, match="unknown group estimator 'ppo'"):
        sequence_advantages("ppo", r, 4)


def test_outcome_advantage_is_broadcast_to_response_tokens():
    out = to_tokens(t([2.0, -1.0]), t([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(out, t([[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]))


def test_discounted_returns_by_hand():
    # row 0: G2 = 3, G1 = 2 + 0.5·3 = 3.5, G0 = 1 + 0.5·3.5 = 2.75; row 1 ends at t = 1
    g = discounted_returns(t([[1.0, 2.0, 3.0], [4.0, 2.0, 9.0]]), t([[1, 1, 1], [1, 1, 0]]), gamma=0.5)
    torch.testing.assert_close(g, t([[2.75, 3.5, 3.0], [5.0, 2.0, 0.0]]), **TOL)


def test_reinforce_pp_by_hand():
    # log ratios row 0: 0.5, −0.5, 1.0 (score 1); row 1: 0.2, 0.0 (score −1, last token masked); β = 0.1, k1
    ref = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    logp = t([[0.5, -0.5, 1.0], [0.2, 0.0, 7.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, kl = reinforce_pp_advantages(t([1.0, -1.0]), logp, ref, mask, kl_coef=0.1, gamma=0.5)
    # token rewards: [−0.05, 0.05, 0.9], [−0.02, −1]; returns (γ = 0.5): [0.2, 0.5, 0.9], [−0.52, −1]
    returns = [0.2, 0.5, 0.9, -0.52, -1.0]
    mean = sum(returns) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 4)   # unbiased, over the global batch's tokens
    want = [(x - mean) / std for x in returns]
    torch.testing.assert_close(adv, t([want[:3], want[3:] + [0.0]]), **TOL)
    torch.testing.assert_close(kl, t([[0.5, -0.5, 1.0], [0.2, 0.0, 0.0]]), **TOL)


def test_reinforce_pp_normalises_globally_not_per_prompt():
    # two single-token "prompts" with different scores: per-group normalisation would zero both; global does not
    zero = torch.zeros(2, 1)
    adv, _ = reinforce_pp_advantages(t([1.0, 3.0]), zero, zero, torch.ones(2, 1), kl_coef=0.1)
    torch.testing.assert_close(adv, t([[-1 / math.sqrt(2)], [1 / math.sqrt(2)]]), **TOL)


def test_loss_aggregation_modes():
    loss = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(aggregate_token_loss(loss, mask, "token-mean"), t(10 / 4), **TOL)
    torch.testing.assert_close(aggregate_token_loss(loss, mask, "seq-mean-token-mean"), t((2 + 4) / 2), **TOL)
    torch.testing.assert_close(aggregate_token_loss(loss, mask, "seq-mean-token-sum-norm", 3), t(10 / 6), **TOL)
    # the normaliser is a real knob: doubling it halves the loss
    torch.testing.assert_close(aggregate_token_loss(loss, mask, "seq-mean-token-sum-norm", 6), t(10 / 12), **TOL)
    with pytest.raises(ValueError, match="constant normalizer"):
        aggregate_token_loss(loss, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_token_loss(loss, mask, "sum")


def test_grpo_loss_clips_the_ratio_and_adds_k3_kl():
    mask = torch.ones(2, 1)
    old = torch.zeros(2, 1)
    logp = torch.full((2, 1), math.log(1.5))   # ratio 1.5, ε = 0.2
    adv = t([[1.0], [-1.0]])
    # A = 1: min(1.5, 1.2) = 1.2; A = −1: min(−1.5, −1.2) = −1.5; ref = logp so k3 = 0
    loss, kl = grpo_loss(logp, old, logp.clone(), adv, mask, clip_eps=0.2, kl_coef=0.3, mode="token-mean")
    torch.testing.assert_close(loss, t((-1.2 + 1.5) / 2), **TOL)
    torch.testing.assert_close(kl, t(0.0), **TOL)
    # zero advantage, ref − logp = ln 2: k3 = 2 − 1 − ln 2; d k3 / d logp = 1 − exp(ref − logp) = −1
    logp = torch.zeros(2, 1, requires_grad=True)
    ref = torch.full((2, 1), math.log(2.0))
    loss, kl = grpo_loss(logp, logp.detach(), ref, torch.zeros(2, 1), mask, clip_eps=0.2, kl_coef=0.3,
                         mode="token-mean")
    torch.testing.assert_close(kl, t(1 - math.log(2)), **TOL)
    torch.testing.assert_close(loss, t(0.3 * (1 - math.log(2))), **TOL)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((2, 1), 0.3 * -1.0 / 2), **TOL)
