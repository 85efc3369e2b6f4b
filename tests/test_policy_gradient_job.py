"""Critic-free policy gradient (jobs.drivers.policy_gradient) end to end on a local Ray cluster with the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actors.group import ActorCallError
from jobs.drivers.policy_gradient import PolicyGradientConfig, compute_advantages, frozen_threads, train
from jobs.run.config import ConfigError, build_config

VOLATILE = ("timing_s/", "perf/")  # wall-clock measurements differ between any two runs


def _config(out, *extra):
    return build_config(PolicyGradientConfig, "policy_gradient_tiny", [f"output_dir={out}", *extra])


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.mark.slow
def test_grpo_raises_the_programmatic_reward_without_a_critic(ray_cluster, tmp_path):
    summary = train(_config(tmp_path))
    rows = [r for r in _rows(tmp_path / "policy_gradient_tiny") if r["step"] > 0]
    assert summary["roles"] == ["generator", "judge", "policy", "reference", "reward"]
    # measured here: held-out gold reward 0.10 -> 0.37 in 12 steps at rollout temperature 0.1 (0.08 -> 0.38 with
    # the former top-k 20 sampling); 0.15 is far above the untrained ~8-10% rate
    assert summary["start"]["eval/gold_reward_mean"] < 0.15 < summary["end"]["eval/gold_reward_mean"]
    # GRPO: the KL is a k3 loss term, not a reward (the metric is the mean over the step's 8 minibatches of the
    # same 0.05, which float summation leaves within an ulp or two)
    assert rows[0]["actor/kl_in_loss_coef"] == pytest.approx(0.05, rel=1e-12)
    assert rows[0]["actor/ratio_max_dev_first_minibatch"] < 1e-5  # on-policy: the ratio starts at 1


@pytest.mark.slow
def test_rloo_puts_the_kl_in_the_reward_and_trains(ray_cluster, tmp_path):
    # with a thread budget: the frozen pair scores first on half the threads each, then the policy (score_rollout)
    summary = train(_config(tmp_path, "advantage=rloo", "steps=2", "eval_prompts=4", "torch_threads=2"))
    rows = [r for r in _rows(tmp_path / "policy_gradient_tiny") if r["step"] > 0]
    assert summary["method"] == "rloo" and len(rows) == 2
    # the compute ledger's trained tokens: every epoch (4) reads each sequence's prompt and response tokens
    assert summary["tokens_trained"] % 4 == 0 and summary["tokens_trained"] >= 4 * summary["tokens_generated"] > 0
    assert all(r["actor/kl_in_loss_coef"] == 0.0 and r["advantage/abs_mean"] > 0 for r in rows)
    # RLOO's advantages sum to 0 over each group, and every token of a row carries its row's value
    assert all(abs(r["advantage/mean"]) < 1.0 for r in rows)


@pytest.mark.slow
def test_reinforce_pp_interrupted_then_resumed_equals_the_uninterrupted_run(ray_cluster, tmp_path):
    # step 1's advantages are poisoned with NaN in both runs: the guard skips that update and counts it
    args = ["advantage=reinforce_pp", "steps=4", "checkpoint.every=2", "eval_prompts=4", "faults.nan_at_steps=[1]"]
    full_summary = train(_config(tmp_path, "run_name=full", *args))
    with pytest.raises(ActorCallError, match="policy"):
        train(_config(tmp_path, "run_name=cut", *args, "faults.kill_at_step=policy@3", "faults.max_recoveries=0"))
    summary = train(_config(tmp_path, "run_name=cut", *args, "checkpoint.resume=latest"))
    assert summary["resumed_from"].endswith("step_000002")
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert json.dumps(full) == json.dumps(cut)  # bitwise: every metric of every step (NaN == NaN as text)
    assert full_summary["nonfinite_skipped_steps"] == [1] and summary["nonfinite_skipped_steps"] == [1]
    assert [r["skipped_nonfinite"] for r in full if r["step"] > 0] == [1.0, 0.0, 0.0, 0.0]
    assert summary["tokens_trained"] == full_summary["tokens_trained"] > 0  # the ledger survives the resume
    wa = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_advantage_knob_changes_the_computation(tmp_path):
    # one group of k = 2 with scores 1 and 3, one token each, policy = reference (KL 0)
    scores, zeros, mask = torch.tensor([1.0, 3.0]), torch.zeros(2, 1), torch.ones(2, 1)
    got = {a: compute_advantages(_config(tmp_path, f"advantage={a}", "samples_per_prompt=2"), scores, zeros, zeros,
                                 mask).flatten().tolist() for a in ("rloo", "grpo", "dr_grpo", "reinforce_pp")}
    assert got["rloo"] == [-2.0, 2.0] and got["dr_grpo"] == [-1.0, 1.0]
    s = math.sqrt(2.0)  # unbiased std of {1, 3}
    assert got["grpo"] == pytest.approx([-1 / (s + 1e-4), 1 / (s + 1e-4)], rel=1e-6)   # float32: ~8 ulp
    assert got["reinforce_pp"] == pytest.approx([-1 / s, 1 / s], rel=1e-6)
    # RLOO subtracts kl_coef x sequence KL (k1) from the score: logp − ref = 0.5 on row 1 only, β = 0.05 in the preset
    logp = torch.tensor([[0.0], [0.5]])
    kl = compute_advantages(_config(tmp_path, "advantage=rloo", "samples_per_prompt=2"), scores, logp, zeros, mask)
    assert kl.flatten().tolist() == pytest.approx([-(2 - 0.025), 2 - 0.025], rel=1e-6)


@pytest.mark.parametrize("override, message", [
    (["samples_per_prompt=1"], "samples_per_prompt must be >= 2 for advantage=grpo"),
    (["advantage=ppo"], "advantage must be one of rloo, grpo, dr_grpo, reinforce_pp, got 'ppo'"),
    (["update.clip_eps=2"], "update.clip_eps must be in (0, 1), got 2"),
    (["kl_coef=-1"], "kl_coef must be >= 0, got -1"),
])
def test_bad_policy_gradient_config_is_rejected_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, *override)


def test_the_frozen_pair_shares_the_thread_budget():
    # reference and reward model score side by side: half the budget each, at least one; no budget: Ray's one thread
    assert [frozen_threads(t) for t in (None, 1, 2, 3, 16)] == [None, 1, 1, 1, 8]
