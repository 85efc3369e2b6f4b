"""PPO end to end on a local Ray cluster with the tiny model and a programmatic reward."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from jobs.run.config import ConfigError, build_config
from actors.math.ppo_math import AdaptiveKLController
from jobs.drivers.ppo import PPOConfig, step_ppo_args, train

PPO_METRICS = ("actor/pg_loss", "actor/pg_clipfrac", "actor/approx_kl", "actor/entropy", "critic/vf_loss",
               "critic/vf_clipfrac", "critic/vf_explained_var", "reward/score_mean", "reward/kl_penalty",
               "objective/kl", "response_length/mean", "perf/tokens_per_s", "rollout/logprob_diff",
               *[f"timing_s/{p}" for p in ("generate", "sync_weights", "ref", "reward", "values", "advantages",
                                           "update_actor", "update_critic", "step")])


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ppo_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    config = build_config(PPOConfig, "ppo_tiny", [f"output_dir={out}"])
    summary = train(config)
    rows = _rows(out / config.run_name)
    return config, summary, [r for r in rows if r["step"] > 0], out / config.run_name


@pytest.mark.slow
def test_ppo_raises_the_programmatic_reward(ppo_run):
    _, summary, rows, _ = ppo_run
    assert len(rows) == 20
    first = sum(r["reward/score_mean"] for r in rows[:5]) / 5
    last = sum(r["reward/score_mean"] for r in rows[-5:]) / 5
    assert last > 1.5 * first
    assert summary["end"]["eval/gold_reward_mean"] > summary["start"]["eval/gold_reward_mean"] + 0.05
    assert all(r["objective/kl"] == r["objective/kl"] for r in rows)  # reported, finite


@pytest.mark.slow
def test_first_minibatch_ratio_is_exactly_one_and_generator_agrees(ppo_run):
    """At the preset's rollout temperature (0.1, not 1): the generator's log-probs of its samples are the
    trainer's old log-probs at that temperature, and the update scores at it too (ratio exactly 1)."""
    config, _, rows, _ = ppo_run
    assert config.rollout.temperature != 1.0
    assert all(r["actor/ratio_max_dev_first_minibatch"] == 0.0 for r in rows)
    assert all(r["rollout/logprob_diff"] < 1e-4 for r in rows)


@pytest.mark.slow
def test_ppo_reports_the_standard_metrics_and_a_loadable_checkpoint(ppo_run):
    _, _, rows, folder = ppo_run
    for key in PPO_METRICS:
        assert key in rows[0], key
    assert (folder / "checkpoint" / "config.yaml").exists()
    assert AutoModelForCausalLM.from_pretrained(folder / "checkpoint").config.num_hidden_layers == 2


@pytest.mark.slow
def test_with_a_thread_budget_the_passes_and_the_updates_take_turns(ppo_run):
    """ppo_tiny sets torch_threads, so no two trainers share the cores: the reference and the reward model
    score side by side, then the policy, then the critic; the critic updates, then the policy. Each actor
    times its own call, so one after the other means the phase's wall time holds the sum of the later ones
    (concurrent calls would overlap, and their wall time approach the longest one instead)."""
    config, _, rows, _ = ppo_run
    assert config.torch_threads == 1
    for r in rows:
        assert r["timing_s/update"] >= r["timing_s/update_actor"] + r["timing_s/update_critic"]
        assert r["timing_s/score"] >= (max(r["timing_s/ref"], r["timing_s/reward"]) + r["timing_s/old_logprobs"]
                                       + r["timing_s/values"])


@pytest.mark.slow
@pytest.mark.extended  # a second PPO run (~2 min); the controller's math is tested exactly in test_ppo_math
def test_adaptive_kl_controller_reins_in_kl(ppo_run, tmp_path):
    """Same run with the adaptive controller (target 1 nat): the coefficient rises and KL stays lower."""
    _, _, fixed_rows, _ = ppo_run
    config = build_config(PPOConfig, "ppo_tiny", [f"output_dir={tmp_path}", "steps=12", "kl.adaptive=true",
                                                  "kl.coef=0.2", "kl.target=1.0", "kl.horizon=64", "eval_every=0"])
    summary = train(config)
    rows = [r for r in _rows(tmp_path / config.run_name) if r["step"] > 0]
    assert summary["kl_coef_final"] > 0.2
    assert rows[-1]["objective/kl_coef"] > rows[0]["objective/kl_coef"]
    adaptive_kl = sum(r["objective/kl"] for r in rows[-4:]) / 4
    fixed_kl = sum(r["objective/kl"] for r in fixed_rows[8:12]) / 4
    assert adaptive_kl < fixed_kl


@pytest.mark.parametrize("override, key", [("kl.estimator=k9", "kl.estimator"), ("ppo.clip_eps=1.5", "ppo.clip_eps"),
                                           ("reward.kind=learned", "reward.model"), ("steps=0", "steps"),
                                           ("ppo.minibatch_size=6", "ppo.minibatch_size"),
                                           ("placement.trainer.gpu_pool=1", "placement.trainer")])
def test_bad_ppo_config_is_rejected_naming_the_key(override, key):
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        build_config(PPOConfig, "ppo_tiny", [override])


def test_in_loss_kl_uses_the_adaptive_controllers_coefficient_each_step():
    """kl.in_loss + kl.adaptive: the policy's per-step hyper-parameters carry the controller's current β.
    Ziegler's update from β=0.2 with KL=3, target 1 (error 2 clipped to 0.2), 64 samples, horizon 64:
    β = 0.2 · (1 + 0.2 · 64/64) ≈ 0.24, compared with the same float expression (== holds exactly)."""
    config = build_config(PPOConfig, "ppo_tiny", ["kl.in_loss=true", "kl.adaptive=true", "kl.coef=0.2",
                                                  "kl.target=1.0", "kl.horizon=64"])
    ctl = AdaptiveKLController(config.kl.coef, config.kl.target, config.kl.horizon)
    assert step_ppo_args(config, ctl).kl_in_loss_coef == 0.2
    ctl.update(3.0, 64)
    args = step_ppo_args(config, ctl)
    assert args.kl_in_loss_coef == 0.2 * (1.0 + 0.2 * 64 / 64) and args.clip_eps == config.ppo.clip_eps
    off = build_config(PPOConfig, "ppo_tiny", ["kl.adaptive=true", "kl.target=1.0", "kl.horizon=64"])
    assert step_ppo_args(off, ctl).kl_in_loss_coef == 0.0  # KL in the reward, not the loss
