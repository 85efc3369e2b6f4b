"""The drivers with an FSDP2-sharded policy (and critic): `policy.num_workers=2` on gloo gives the
single-worker run's losses, and a sharded run's checkpoint resumes on one worker."""

from __future__ import annotations

import json
import math

import pytest

from jobs.run.config import ConfigError, build_config
from jobs.drivers.dpo import DPOConfig
from jobs.drivers.dpo import train as train_dpo
from jobs.drivers.ppo import PPOConfig
from jobs.drivers.ppo import train as train_ppo

pytestmark = pytest.mark.slow


def _rows(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _close(a: float, b: float, rel: float = 1e-4, abs_: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def test_dpo_on_two_fsdp_workers_matches_one_worker_and_resumes_on_one(ray_cluster, tmp_path):
    args = [f"output_dir={tmp_path}", "max_steps=4", "eval_every=2", "checkpoint.every=2"]
    train_dpo(build_config(DPOConfig, "dpo_tiny", [*args, "run_name=one"]))
    sharded = train_dpo(build_config(DPOConfig, "dpo_tiny", [*args, "run_name=two", "policy.num_workers=2"]))
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    for step in (1, 2, 3, 4):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert _close(one[step][key], two[step][key]), (step, key, one[step][key], two[step][key])
    assert _close(one[4]["eval/loss"], two[4]["eval/loss"])
    # The sharded run's step-2 checkpoint (DCP) continues on a single worker to the same end.
    resumed = train_dpo(build_config(DPOConfig, "dpo_tiny", [*args, "run_name=two",
                                                               f"checkpoint.resume={tmp_path}/two/checkpoints/step_000002"]))
    assert resumed["resumed_from"].endswith("step_000002")
    again = _rows(tmp_path / "two")
    assert _close(again[4]["loss"], sharded["final"]["loss"]) and _close(again[4]["loss"], one[4]["loss"])


@pytest.mark.extended  # ~2 min; sharded DPO (same FSDP2 group code) runs in CI
def test_ppo_with_sharded_policy_and_colocated_critic_matches_one_worker(ray_cluster, tmp_path):
    args = [f"output_dir={tmp_path}", "steps=2", "prompts_per_step=8", "eval_every=0", "eval_prompts=8",
            "ppo.micro_batch_size=4"]
    train_ppo(build_config(PPOConfig, "ppo_tiny", [*args, "run_name=one"]))
    summary = train_ppo(build_config(PPOConfig, "ppo_tiny", [*args, "run_name=two", "policy.num_workers=2",
                                                             "critic.num_workers=2", "critic.colocate_with=policy",
                                                             "critic.share=0.5", "policy.share=0.5"]))
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert one[0]["eval/gold_reward_mean"] == two[0]["eval/gold_reward_mean"]
    # Step 1 starts from identical weights and samples the same rollout: the updates must agree.
    for key in ("reward/score_mean", "objective/kl", "actor/pg_loss", "actor/approx_kl", "critic/vf_loss",
                "actor/grad_norm"):
        assert _close(one[1][key], two[1][key]), (key, one[1][key], two[1][key])
    assert two[1]["actor/ratio_max_dev_first_minibatch"] < 1e-5  # the sharded log-probs reproduce the rollout's
    assert two[1]["rollout/logprob_diff"] < 1e-4  # generators got the gathered weights
    assert summary["steps"] == 2


def test_reward_model_on_two_fsdp_workers_matches_one_worker(ray_cluster, tmp_path):
    from jobs.drivers.reward import RewardTrainConfig
    from jobs.drivers.reward import train as train_reward

    args = [f"output_dir={tmp_path}", "max_steps=4", "eval_every=2", "normalize.num_prompts=4"]
    one = train_reward(build_config(RewardTrainConfig, "reward_tiny", [*args, "run_name=one"]))
    two = train_reward(build_config(RewardTrainConfig, "reward_tiny", [*args, "run_name=two", "reward.num_workers=2"]))
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    for step in (1, 2, 3, 4):
        for key in ("loss", "accuracy", "reward/chosen", "reward/rejected", "grad_norm"):
            assert _close(a[step][key], b[step][key]), (step, key, a[step][key], b[step][key])
    assert _close(a[4]["eval/accuracy"], b[4]["eval/accuracy"]) and _close(a[4]["eval/margin"], b[4]["eval/margin"])
    for key in ("reward_mean", "reward_std"):  # normalisation scores gathered from both ranks, in order
        assert _close(one["normalization"][key], two["normalization"][key]), key


def test_bad_layout_is_rejected_naming_the_key():
    with pytest.raises(ConfigError, match="policy.num_workers must be >= 1"):
        build_config(DPOConfig, "dpo_tiny", ["policy.num_workers=0"])
    with pytest.raises(ConfigError, match="critic.colocate_with must be one of policy"):
        build_config(PPOConfig, "ppo_tiny", ["critic.colocate_with=reward"])
    with pytest.raises(ConfigError, match="unknown config key 'policy.fsdp.offload'"):
        build_config(DPOConfig, "dpo_tiny", ["policy.fsdp={offload: true}"])
