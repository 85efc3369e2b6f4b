"""Typed update hyper-parameters (actors.ppo_update.PPOUpdateConfig) and trainer log-probs at the rollout temperature.

Every knob a user sets reaches the computation that uses it: each test sets one knob on a tiny in-process
policy or critic and checks the value that comes out against the hand-computed one. The batch is scored in
one micro-batch with no all-padding column, so the forward pass inside the update and the one behind
``logprobs`` / ``values`` are the same computation (the ratio is exactly 1 when nothing else changes); the
tolerances below only cover fp32 rounding of the few operations the hand value adds on top.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from actors.critic import CriticActor
from actors.math.batch import collate_sequences
from actors.math.ppo_math import entropy_from_logits, masked_mean
from actors.policy import PolicyActor
from actors.ppo_update import PPOUpdateConfig
from jobs.drivers.policy_gradient import PolicyGradientConfig
from jobs.drivers.ppo import PPOConfig
from jobs.run.config import ConfigError, build_config

# |log p| ≈ log(49152) ≈ 10.8 for the random tiny model, where one fp32 ulp is 9.5e-7: a hand value built from
# a log-prob (logp − (logp − c) and the like) carries a few ulps of it; 1e-5 is ~10 ulps.
TOL = 1e-5


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    # four rows with responses of 1, 5, 2 and 3 tokens; the longest row fills every column
    return collate_sequences([[5, 6, 7], [8, 9], [10], [11, 12]], [[13], [14, 15, 16, 17, 18], [19, 20], [21, 22, 23]],
                             tiny_tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def policy():
    return PolicyActor("tiny", torch_threads=1, micro_batch_size=4, optimizer={"lr": 1e-6})


@pytest.fixture(scope="module")
def critic():
    return CriticActor("tiny", torch_threads=1, micro_batch_size=4)


def _policy_step(policy, batch, old, advantages, ref=None, **knobs):
    """(loss, metrics) of the update's forward pass over all four rows with the given knobs, no optimizer step."""
    config = PPOUpdateConfig(minibatch_size=4, micro_batch_size=4, **knobs)
    loss, metrics = policy._ppo_forward(batch, torch.arange(4), old, advantages, ref, config)
    return float(loss.detach()), metrics


# -- log-probs at the rollout temperature (issue 17 a) -------------------------------------------------------
def test_trainer_logprobs_are_log_softmax_of_logits_over_the_rollout_temperature(policy, batch):
    """What the driver asks the policy and the reference for (``logprobs(batch, temperature=T)``) is
    log_softmax(logits / T) at the sampled ids, here recomputed in float64 from the same fp32 logits: the
    fp32 path differs by the rounding of logits / T and of the 49k-term logsumexp, a few ulps of |log p| ≈ 11."""
    mask = batch["loss_mask"][:, 1:].float()
    with torch.no_grad():
        logits = policy._logits(batch).double()
    ids = batch["input_ids"][:, 1:].unsqueeze(-1)
    for temperature in (0.7, 1.0):
        expected = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, ids).squeeze(-1) * mask
        got = policy.logprobs(batch, temperature=temperature)["token_logps"]
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=TOL)
    at_1, at_07 = (policy.logprobs(batch, temperature=t)["token_logps"] for t in (1.0, 0.7))
    assert float((at_1 - at_07).abs().max()) > 1000 * TOL  # the test tells the two temperatures apart


def test_the_update_scores_at_the_rollout_temperature(policy, batch):
    """Old log-probs at T = 0.7 and an update told T = 0.7: the first ratio is exactly 1 (the same forward and
    arithmetic). Told T = 1 instead, it would be off by far more than rounding; the entropy bonus is the
    sampling distribution's, softmax(logits / T), compared with the same fp32 function (bitwise)."""
    mask = batch["loss_mask"][:, 1:].float()
    old = policy.logprobs(batch, temperature=0.7)["token_logps"]
    _, at_rollout = _policy_step(policy, batch, old, mask, temperature=0.7)
    _, at_one = _policy_step(policy, batch, old, mask, temperature=1.0)
    assert at_rollout["actor/ratio_max_dev"] == 0.0
    assert at_one["actor/ratio_max_dev"] > 0.01
    with torch.no_grad():
        logits = policy._logits(batch)
    entropy = masked_mean(entropy_from_logits(logits[:, :-1].float() / 0.7), mask)
    assert at_rollout["actor/entropy"] == float(entropy)


# -- one test per knob: policy ------------------------------------------------------------------------------
def test_clip_eps_high_is_the_upper_clip(policy, batch):
    """Ratio 1.25 on every token, advantage +1: symmetric clip 0.2 takes min(1.25, 1.2) → loss −1.2, every
    token clipped; clip_eps_high 0.3 leaves 1.25 unclipped → loss −1.25."""
    mask = batch["loss_mask"][:, 1:].float()
    logp = policy.logprobs(batch)["token_logps"]
    old = (logp - math.log(1.25)) * mask
    loss, metrics = _policy_step(policy, batch, old, mask)
    assert loss == pytest.approx(-1.2, rel=TOL) and metrics["actor/pg_clipfrac"] == 1.0
    loss, metrics = _policy_step(policy, batch, old, mask, clip_eps_high=0.3)
    assert loss == pytest.approx(-1.25, rel=TOL) and metrics["actor/pg_clipfrac"] == 0.0


def test_clip_eps_is_the_lower_clip(policy, batch):
    """Ratio 0.75, advantage −1: clip_eps 0.2 gives min(−0.75, −0.8) → loss 0.8 (clipped); 0.3 gives 0.75."""
    mask = batch["loss_mask"][:, 1:].float()
    logp = policy.logprobs(batch)["token_logps"]
    old = (logp - math.log(0.75)) * mask
    loss, metrics = _policy_step(policy, batch, old, -mask, clip_eps=0.2)
    assert loss == pytest.approx(0.8, rel=TOL) and metrics["actor/pg_clipfrac"] == 1.0
    loss, metrics = _policy_step(policy, batch, old, -mask, clip_eps=0.3)
    assert loss == pytest.approx(0.75, rel=TOL) and metrics["actor/pg_clipfrac"] == 0.0


def test_entropy_coef_subtracts_the_entropy_bonus(policy, batch):
    """Ratio 1, advantage +1: loss = −1 − entropy_coef × mean token entropy (≈ log 49152 for the random model)."""
    mask = batch["loss_mask"][:, 1:].float()
    old = policy.logprobs(batch)["token_logps"]
    plain, metrics = _policy_step(policy, batch, old, mask)
    bonus, _ = _policy_step(policy, batch, old, mask, entropy_coef=0.01)
    assert plain == pytest.approx(-1.0, rel=TOL)
    assert metrics["actor/entropy"] == pytest.approx(math.log(49152), abs=0.1)
    assert bonus == pytest.approx(-1.0 - 0.01 * metrics["actor/entropy"], rel=TOL)


@pytest.mark.parametrize("estimator, value", [("k1", 0.3), ("k2", 0.5 * 0.3 ** 2), ("k3", math.exp(-0.3) - 1 + 0.3)])
def test_the_in_loss_kl_uses_the_chosen_estimator(policy, batch, estimator, value):
    """log π − log π_ref = 0.3 on every token: k1 = 0.3, k2 = 0.045, k3 = e^−0.3 − 1 + 0.3 ≈ 0.0408, added to the
    loss times kl_in_loss_coef (0 leaves the loss alone)."""
    mask = batch["loss_mask"][:, 1:].float()
    logp = policy.logprobs(batch)["token_logps"]
    ref = (logp - 0.3) * mask
    plain, _ = _policy_step(policy, batch, logp, mask, ref, kl_estimator=estimator)
    loss, metrics = _policy_step(policy, batch, logp, mask, ref, kl_in_loss_coef=0.5, kl_estimator=estimator)
    assert metrics["actor/kl_loss"] == pytest.approx(value, abs=TOL)
    assert loss == pytest.approx(plain + 0.5 * value, abs=TOL)
    with pytest.raises(ValueError, match="ref_logprobs"):
        _policy_step(policy, batch, logp, mask, None, kl_in_loss_coef=0.5)


def test_epochs_and_minibatch_size_set_the_number_of_updates(policy, batch):
    old = policy.logprobs(batch)["token_logps"]
    metrics = policy.train_ppo(batch, old, torch.zeros_like(old), PPOUpdateConfig(epochs=3, minibatch_size=2,
                                                                                   micro_batch_size=1))
    assert metrics["actor/updates"] == 6.0  # 3 epochs × 4 rows / 2 per minibatch


# -- one test per knob: critic ------------------------------------------------------------------------------
def _critic_step(critic, batch, old_values, returns, **knobs):
    loss, metrics = critic._value_forward(batch, torch.arange(4), old_values, returns,
                                          PPOUpdateConfig(minibatch_size=4, micro_batch_size=4, **knobs))
    return float(loss), metrics


def test_vf_coef_scales_the_critic_loss_only(critic, batch):
    """×0.5 is exact in binary floating point: the optimised loss halves exactly, the logged value loss stays."""
    mask = batch["loss_mask"][:, 1:].float()
    values = critic.values(batch)["values"]
    returns = values + mask
    full, a = _critic_step(critic, batch, values, returns, vf_coef=1.0)
    half, b = _critic_step(critic, batch, values, returns, vf_coef=0.5)
    assert half == 0.5 * full and a["critic/vf_loss"] == b["critic/vf_loss"] == pytest.approx(0.5, rel=TOL)


@pytest.mark.parametrize("value_clip, loss, clipfrac", [(0.2, 0.5 * 1.8 ** 2, 1.0), (2.0, 0.5, 0.0), (None, 0.5, 0.0)])
def test_value_clip_bounds_the_value_change(critic, batch, value_clip, loss, clipfrac):
    """V − V_old = 1 and R = V + 1 on every token: clip 0.2 puts V_clip = V − 0.8, so max((V − R)², (V_clip − R)²)
    = 1.8² and the loss ½·3.24; clip 2 (or none) leaves V: ½·1. Values are O(1): fp32 error ~1e-7."""
    mask = batch["loss_mask"][:, 1:].float()
    values = critic.values(batch)["values"]
    got, metrics = _critic_step(critic, batch, values - mask, values + mask, value_clip=value_clip, vf_coef=1.0)
    assert got == pytest.approx(loss, rel=TOL) and metrics["critic/vf_clipfrac"] == clipfrac


# -- the drivers' configs: every knob reaches the dataclass; one default each; bad values refused ------------
def test_ppo_config_hands_every_knob_to_the_update():
    assert PPOConfig().update_config() == PPOUpdateConfig()  # the user-facing defaults are the dataclass's
    config = build_config(PPOConfig, "ppo_tiny", [
        "seed=7", "rollout.temperature=0.7", "ppo.epochs=2", "ppo.minibatch_size=4", "ppo.micro_batch_size=2",
        "ppo.clip_eps=0.1", "ppo.clip_eps_high=0.3", "ppo.value_clip=null", "ppo.vf_coef=0.5",
        "ppo.entropy_coef=0.01", "kl.in_loss=true", "kl.coef=0.2", "kl.loss_estimator=k2"])
    assert config.update_config() == PPOUpdateConfig(
        epochs=2, minibatch_size=4, micro_batch_size=2, clip_eps=0.1, clip_eps_high=0.3, value_clip=None,
        vf_coef=0.5, entropy_coef=0.01, kl_in_loss_coef=0.2, kl_estimator="k2", temperature=0.7, seed=7)
    assert config.update_config(0.3).kl_in_loss_coef == 0.3  # the controller's β of the step
    assert build_config(PPOConfig, "ppo_tiny", ["kl.coef=0.2"]).update_config().kl_in_loss_coef == 0.0


def test_policy_gradient_config_hands_every_knob_to_the_update():
    config = build_config(PolicyGradientConfig, "policy_gradient_tiny", [
        "seed=3", "rollout.temperature=0.5", "update.epochs=1", "update.clip_eps=0.1", "update.clip_eps_high=0.28",
        "update.entropy_coef=0.02", "update.kl_estimator=k2", "kl_coef=0.1"])
    update = config.update_config()
    assert (update.epochs, update.clip_eps, update.clip_eps_high, update.entropy_coef, update.kl_estimator,
            update.kl_in_loss_coef, update.temperature, update.seed) == (1, 0.1, 0.28, 0.02, "k2", 0.1, 0.5, 3)
    rloo = build_config(PolicyGradientConfig, "policy_gradient_tiny", ["advantage=rloo"])
    assert rloo.update_config().kl_in_loss_coef == 0.0  # RLOO's KL is in the reward


def test_update_config_knob_names_are_checked_at_the_ray_boundary():
    with pytest.raises(TypeError, match="vf_coeff"):
        PPOUpdateConfig.coerce({"vf_coeff": 0.5})  # a misspelt knob fails, it is not silently defaulted
    assert PPOUpdateConfig.coerce({"clip_eps": 0.1}) == dataclasses.replace(PPOUpdateConfig(), clip_eps=0.1)


@pytest.mark.parametrize("cls, preset", [(PPOConfig, "ppo_tiny"), (PolicyGradientConfig, "policy_gradient_tiny")])
@pytest.mark.parametrize("override, key", [("rollout.top_k=20", "rollout.top_k"), ("rollout.top_p=0.9", "rollout.top_p"),
                                           ("rollout.temperature=0", "rollout.temperature")])
def test_truncated_or_greedy_rollouts_are_refused_in_one_line(cls, preset, override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + " must be ") as error:
        build_config(cls, preset, [override])
    assert "\n" not in str(error.value) and ("off-policy" in str(error.value) or "greedy" in str(error.value))


@pytest.mark.parametrize("cls, preset, override, key", [
    (PPOConfig, "ppo_tiny", "ppo.clip_eps_high=0", "ppo.clip_eps_high"),
    (PPOConfig, "ppo_tiny", "ppo.value_clip=0", "ppo.value_clip"),
    (PPOConfig, "ppo_tiny", "ppo.vf_coef=0", "ppo.vf_coef"),
    (PPOConfig, "ppo_tiny", "ppo.entropy_coef=-1", "ppo.entropy_coef"),
    (PPOConfig, "ppo_tiny", "kl.loss_estimator=k2", "kl.loss_estimator"),  # the KL is in the reward
    (PPOConfig, "ppo_tiny", "kl.in_loss=true kl.loss_estimator=k9", "kl.loss_estimator"),
    (PPOConfig, "ppo_tiny", "kl.in_loss=true kl.estimator=k3", "kl.estimator"),  # the reward's, unused in the loss
    (PolicyGradientConfig, "policy_gradient_tiny", "update.clip_eps_high=-0.1", "update.clip_eps_high"),
    (PolicyGradientConfig, "policy_gradient_tiny", "advantage=rloo update.kl_estimator=k2", "update.kl_estimator"),
])
def test_bad_update_knobs_are_refused_naming_the_key(cls, preset, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(cls, preset, override.split())
