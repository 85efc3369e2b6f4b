"""Pair labelling of the comparison's preference data: every pair, or best vs worst, by gold score."""
from __future__ import annotations

import pytest

from jobs.experiment.preference_data import PreferenceDataConfig, label_pairs


def test_best_vs_worst_keeps_one_pair_the_largest_gap():
    rows = label_pairs("p", ["a", "b", "c", "d"], [0.1, 0.9, 0.5, -0.3], pairing="best_vs_worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b", "d")]
    assert rows[0]["chosen_score"] == 0.9 and rows[0]["rejected_score"] == -0.3
    # the same samples, every pair: 6 pairs of which best-vs-worst is the one with the largest gap
    every = label_pairs("p", ["a", "b", "c", "d"], [0.1, 0.9, 0.5, -0.3])
    assert len(every) == 6
    assert max(every, key=lambda r: r["chosen_score"] - r["rejected_score"]) == rows[0]


def test_best_vs_worst_skips_empty_replies_ties_and_small_gaps():
    # the best-scored reply is empty: the best usable one is "c"
    rows = label_pairs("p", ["a", " ", "c"], [0.0, 1.0, 0.5], pairing="best_vs_worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("c", "a")]
    assert label_pairs("p", ["a", "b"], [0.5, 0.5], pairing="best_vs_worst") == []  # all tied
    assert label_pairs("p", ["a", "b"], [0.5, 0.6], min_gap=0.2, pairing="best_vs_worst") == []
    assert label_pairs("p", ["a", ""], [0.5, 0.9], pairing="best_vs_worst") == []  # one usable reply


def test_pairing_is_validated():
    with pytest.raises(ValueError, match="preference.pairing must be one of all, best_vs_worst, got 'best'"):
        PreferenceDataConfig(pairing="best").validate()
