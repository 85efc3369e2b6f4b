"""Bootstrap confidence intervals and the shuffled batch order every driver uses."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.run.sampler import ShuffledBatches, plan_steps
import pandas as pd

from jobs.experiment.stats import bootstrap_ci, paired_difference, prompt_bootstrap, significant


def test_bootstrap_ci_matches_a_direct_resampling_loop():
    values = np.array([0.1, -0.4, 0.9, 0.3, 0.0, 0.7, -0.2])
    low, high = bootstrap_ci(values, confidence=0.9, resamples=500, seed=3)
    rng = np.random.default_rng(3)
    draws = rng.integers(0, len(values), size=(500, len(values)))
    means = [values[row].mean() for row in draws]
    assert (low, high) == pytest.approx((np.quantile(means, 0.05), np.quantile(means, 0.95)))
    assert low < values.mean() < high


def test_bootstrap_ci_narrows_with_more_data_and_handles_one_value():
    rng = np.random.default_rng(0)
    small = bootstrap_ci(rng.normal(size=20))
    large = bootstrap_ci(rng.normal(size=2000))
    assert large[1] - large[0] < (small[1] - small[0]) / 5
    # The normal-theory half-width 1.96/sqrt(n) is what the bootstrap should approximate.
    assert (large[1] - large[0]) / 2 == pytest.approx(1.96 / np.sqrt(2000), rel=0.15)
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_prompt_bootstrap_resamples_prompts_not_samples():
    # prompt 0 has three samples scoring 0, prompt 1 one sample scoring 1: per-prompt means (0, 1),
    # estimate 0.5 (not the sample mean 0.25). Resampling two prompts gives the means {0, .5, 1} with
    # probabilities {1/4, 1/2, 1/4}, so with 4000 draws the 2.5% / 97.5% quantiles are exactly 0 and 1
    # (the chance that fewer than 2.5% of 4000 draws land on an end, each 1/4, is astronomically small).
    frame = pd.DataFrame({"prompt_index": [0, 0, 0, 1], "gold": [0.0, 0.0, 0.0, 1.0]})
    assert prompt_bootstrap(frame, "gold", resamples=4000) == (0.5, 0.0, 1.0)
    # resampling samples singly would include 0.0 as its low end too but put the mean at 0.25
    assert bootstrap_ci(frame["gold"].to_numpy(), resamples=4000)[0] == 0.0


def test_paired_difference_cancels_prompt_effects_and_uses_common_prompts():
    # b varies a lot across prompts; a = b + 0.25 on every shared prompt: the paired difference is
    # exactly 0.25 with a zero-width interval, while the unpaired intervals of a and b overlap widely.
    b = pd.DataFrame({"prompt_index": [0, 0, 1, 1, 2, 2], "gold": [0.0, 0.5, 2.0, 1.0, -1.0, -2.0]})
    a = pd.DataFrame({"prompt_index": [0, 0, 1, 1, 2, 2, 7], "gold": [0.25, 0.75, 1.75, 1.75, -1.25, -1.25, 9.0]})
    diff, low, high = paired_difference(a, b, "gold")  # prompt 7 is only in a: ignored
    assert (diff, low, high) == (0.25, 0.25, 0.25)
    assert significant(low, high)
    a_ci, b_ci = prompt_bootstrap(a[a.prompt_index < 7], "gold"), prompt_bootstrap(b, "gold")
    assert a_ci[1] < b_ci[2] and b_ci[1] < a_ci[2]
    assert not significant(-0.1, 0.2)
    with pytest.raises(ValueError, match="share no prompt_index"):
        paired_difference(a[a.prompt_index == 7], b, "gold")


def test_policy_seeds_are_independent_per_run_and_stable_across_processes():
    import subprocess
    import sys

    from jobs.experiment.evaluate import policy_seed

    runs = ["SFT", "preferred-ft", "dpo-beta0.1", "dpo-beta0.5", "ppo-kl0.05", "ppo-kl0.5", "ppo-gt-kl0.5"]
    seeds = [policy_seed(0, run) for run in runs]
    assert len(set(seeds)) == len(runs)                      # no two policies share their random numbers
    assert policy_seed(1, "SFT") != policy_seed(0, "SFT")    # the experiment's seed still moves every run
    # stable: a fresh interpreter with another hash salt derives the same seed (Python's hash() would not)
    code = "from jobs.experiment.evaluate import policy_seed; print(policy_seed(0, 'SFT'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    assert int(out) == seeds[0]


def test_shuffled_batches_cover_each_pass_once_and_are_seeded():
    batches = ShuffledBatches(10, 4, seed=7)
    drawn = [batches.next() for _ in range(5)]  # 20 indices = two whole passes
    flat = [i for b in drawn for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    again = ShuffledBatches(10, 4, seed=7)
    assert [again.next() for _ in range(5)] == drawn
    assert [ShuffledBatches(10, 4, seed=8).next() for _ in range(5)] != drawn


def test_indices_within_is_the_union_of_the_next_batches_and_moves_nothing():
    batches = ShuffledBatches(10, 4, seed=7)
    batches.next()                                   # mid-pass: the rest of the pass, then a new one
    needed = batches.indices_within(2)
    state = batches.state_dict()
    drawn = batches.next() + batches.next()
    assert needed == sorted(set(drawn))  # 8 draws; fewer distinct rows where a new pass repeats one
    fresh = ShuffledBatches(10, 4, seed=7)
    fresh.load_state_dict(state)
    assert fresh.next() + fresh.next() == drawn      # indices_within left the position alone
    assert ShuffledBatches(10, 4, seed=7).indices_within(5) == list(range(10))  # passes joined: every row


def test_plan_steps():
    assert plan_steps(100, 16, 1, None) == (6, 6)
    assert plan_steps(100, 16, 3, None) == (6, 18)
    assert plan_steps(100, 16, 3, 10) == (6, 10)      # cap on a multi-epoch run
    assert plan_steps(100, 16, 1, 30) == (6, 30)      # one epoch: max_steps sets the length
    assert plan_steps(5, 16, 1, None) == (1, 1)


def test_win_rate_interval_resamples_prompts_not_samples():
    """Four prompts x four samples: the policy wins every sample of prompts 0 and 1 and loses every sample
    of 2 and 3. Its win rate is 0.5 and its interval is that of four prompt means (1, 1, 0, 0), as wide
    as [0, 1]; resampling the sixteen comparisons singly would have made it look tight."""
    from jobs.experiment.evaluate import win_rates

    def frame(gold):
        return pd.DataFrame([{"temperature": 1.0, "prompt_index": p, "sample_index": i, "gold": gold(p)}
                             for p in range(4) for i in range(4)])

    table = win_rates(frame(lambda p: 1.0 if p < 2 else -1.0), frame(lambda p: 0.0), seed=3)
    row = table.iloc[0]
    low, high = bootstrap_ci(np.array([1.0, 1.0, 0.0, 0.0]), seed=3)
    assert (row.win_rate, row.win_rate_ci_low, row.win_rate_ci_high) == (0.5, low, high)
    assert (low, high) == (0.0, 1.0) and (row.comparisons, row.prompts) == (16, 4)
    slot_low, slot_high = bootstrap_ci(np.repeat([1.0, 1.0, 0.0, 0.0], 4), seed=3)
    assert slot_high - slot_low < high - low
