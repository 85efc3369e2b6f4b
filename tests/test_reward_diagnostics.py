"""Reward-model diagnostics and Best-of-N differences: hand-computed cases."""

import math

import numpy as np
import pandas as pd
import pytest

from jobs.experiment.reward_diagnostics import (WEAK_ACCURACY, best_of_n_differences, pool_pair_accuracy,
                                                reward_model_diagnostics, reward_model_sentences, spearman)


def test_spearman_matches_the_rank_formula():
    # Ranks of x: 1,2,3,4,5; of y: 2,1,4,3,5; d = -1,1,-1,1,0; Σd² = 4; ρ = 1 − 6·4/(5·24) = 0.8.
    assert spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-12)
    # Ties take average ranks: x ranks 1.5,1.5,3; y ranks 1,2,3 -> Pearson of the ranks.
    rx, ry = np.array([1.5, 1.5, 3.0]), np.array([1.0, 2.0, 3.0])
    assert spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)


def _pool(rm, gold):
    rows = []
    for p, (r, g) in enumerate(zip(rm, gold)):
        for s, (a, b) in enumerate(zip(r, g)):
            rows.append({"prompt_index": p, "sample_index": s, "reward_model_score": a, "gold_score": b})
    return pd.DataFrame(rows)


def test_pool_pair_accuracy_counts_within_prompt_pairs_above_the_gap():
    # Prompt 0: gold 0, 1, 2 and rm 0, 2, 1 -> pairs (0,1) right, (0,2) right, (1,2) wrong.
    # Prompt 1: gold 0, 0.05 (within gap 0.1: dropped) and rm tie on a counted pair would be 0.5.
    # Prompt 2: gold 0, 1 with rm tied -> one half.
    pool = _pool([[0, 2, 1], [0, 1], [3, 3]], [[0, 1, 2], [0, 0.05], [0, 1]])
    accuracy, pairs = pool_pair_accuracy(pool, gap=0.1)
    assert pairs == 4
    assert accuracy == pytest.approx((1 + 1 + 0 + 0.5) / 4, abs=1e-12)


def test_best_of_n_differences_are_paired_per_prompt():
    # Two prompts, pools of 2. Prompt 0: rm picks the gold-1 sample; best-of-2 = 1, best-of-1 = mean 0.5.
    # Prompt 1: rm picks the gold-0 sample; best-of-2 = 0, best-of-1 = 0.5. Differences +0.5 and −0.5.
    pool = _pool([[0, 1], [1, 0]], [[0, 1], [0, 1]])
    table = best_of_n_differences(pool, 2, seed=0)
    assert list(table["a"]) == ["best-of-2"] and list(table["b"]) == ["best-of-1"]
    assert table["diff"].iloc[0] == pytest.approx(0.0, abs=1e-12)
    assert table["ci_low"].iloc[0] == pytest.approx(-0.5) and table["ci_high"].iloc[0] == pytest.approx(0.5)


def test_a_fall_after_the_peak_gets_its_own_paired_row():
    # Pools of 4 where the reward model ranks gold-best second-highest and gold-worst highest:
    # N=2 gains, N=4 always picks the worst. Peak N=2, so "best-of-4 − best-of-2" is added.
    rm, gold = [[0, 1, 2, 3]] * 3, [[0.0, 0.5, 1.0, 0.2]] * 3
    table = best_of_n_differences(_pool(rm, gold), 4, seed=0)
    assert list(zip(table["a"], table["b"])) == [("best-of-2", "best-of-1"), ("best-of-4", "best-of-1"),
                                                 ("best-of-4", "best-of-2")]
    # best-of-1 = 0.425; best-of-2 = Σ C(k−1,1)/C(4,2)·sorted gold = (0·0 + 1·0.5 + 2·1.0 + 3·0.2)/6 = 3.1/6;
    # best-of-4 = the rm's top pick's gold, 0.2.
    assert table["diff"].iloc[0] == pytest.approx(3.1 / 6 - 0.425, abs=1e-12)
    assert table["diff"].iloc[2] == pytest.approx(0.2 - 3.1 / 6, abs=1e-12)


def test_a_weak_reward_model_is_never_called_over_optimised():
    # Gold falls significantly from N=2 to N=4, every prompt alike: with a weak reward model the
    # report names the weakness and does not use the word over-optimisation; with a strong one it does.
    rm, gold = [[0, 1, 2, 3]] * 8, [[0.0, 0.5, 1.0, 0.2]] * 8
    pool = _pool(rm, gold)
    differences = best_of_n_differences(pool, 4, seed=0)
    weak = reward_model_diagnostics({"end": {"eval/accuracy": 0.59}, "eval_pairs": 17, "train_pairs": 153,
                                     "steps": 12}, pool)
    assert weak["weak"] and weak["accuracy"] < WEAK_ACCURACY
    text = " ".join(reward_model_sentences(weak, differences))
    assert "weak" in text and "over-optimisation" not in text
    strong = reward_model_diagnostics({"end": {"eval/accuracy": 0.8}, "eval_pairs": 200, "train_pairs": 700,
                                       "steps": 90}, pool)
    assert not strong["weak"]
    assert "over-optimisation" in " ".join(reward_model_sentences(strong, differences))


def test_diagnostics_carry_the_reports_fields():
    pool = _pool([[0, 1, 2], [2, 1, 0]], [[0, 1, 2], [0, 1, 2]])
    d = reward_model_diagnostics({"start": {"eval/accuracy": 0.5}, "end": {"eval/accuracy": 0.8},
                                  "eval_pairs": 10, "train_pairs": 90, "steps": 5}, pool)
    assert {"accuracy", "spearman", "eval_pairs", "train_pairs"} <= set(d)
    assert d["spearman"] == pytest.approx(spearman([0, 1, 2, 2, 1, 0], [0, 1, 2, 0, 1, 2]), abs=1e-12)
    assert d["pool_pairs"] == 6 and d["pool_pair_accuracy"] == pytest.approx(0.5)
    assert d["spearman_ci_low"] <= d["spearman"] <= d["spearman_ci_high"]
    missing = reward_model_diagnostics({}, None)
    assert math.isnan(missing["accuracy"]) and missing["weak"]
