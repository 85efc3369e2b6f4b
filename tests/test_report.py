"""The report's paired differences and the sentences generated from them (no Ray: tables in, text out)."""

from __future__ import annotations

import pandas as pd
import pytest

from jobs.experiment.differences import (compute_matched, compute_matched_sentences, difference_sentences,
                                         leader_sentences, paired_differences)
from jobs.experiment.report import summary_sentences


def _samples(golds_by_prompt: dict[int, list[float]], temperature: float = 1.0) -> pd.DataFrame:
    rows = [{"temperature": temperature, "prompt_index": p, "sample_index": i, "gold": g}
            for p, golds in golds_by_prompt.items() for i, g in enumerate(golds)]
    return pd.DataFrame(rows)


def _runs(evaluations: dict, methods: dict) -> pd.DataFrame:
    rows = []
    for run, frame in evaluations.items():
        mean = frame.groupby("prompt_index")["gold"].mean().mean()
        rows.append({"run": run, "method": methods[run], "gold_reward": mean, "gold_reward_ci_low": mean - 1,
                     "gold_reward_ci_high": mean + 1, "kl_exact": 0.1, "kl": 0.1})
    return pd.DataFrame(rows)


# SFT varies across prompts; DPO is SFT + 0.25 on every prompt (a sure gain once paired), PPO is SFT
# plus a +0.5 / −0.5 swing (mean 0: its interval must include 0). Exact binary fractions throughout.
SFT = {0: [0.0, 0.5], 1: [2.0, 1.0], 2: [-1.0, -2.0], 3: [0.5, 0.5]}
EVALUATIONS = {
    "SFT": _samples(SFT),
    "dpo-beta0.1": _samples({p: [g + 0.25 for g in golds] for p, golds in SFT.items()}),
    "ppo-kl0.05": _samples({p: [g + (0.5 if p % 2 else -0.5) for g in golds] for p, golds in SFT.items()}),
}
METHODS = {"SFT": "SFT", "dpo-beta0.1": "DPO", "ppo-kl0.05": "PPO"}


def test_paired_differences_vs_sft_and_best_dpo_vs_best_ppo():
    table = paired_differences(_runs(EVALUATIONS, METHODS), EVALUATIONS, 1.0).set_index(["a", "b"])
    assert list(table.columns) == ["temperature", "diff", "ci_low", "ci_high"]
    assert tuple(table.loc[("dpo-beta0.1", "SFT")]) == (1.0, 0.25, 0.25, 0.25)
    ppo = table.loc[("ppo-kl0.05", "SFT")]
    # per-prompt differences (−.5, +.5, −.5, +.5): mean 0; a 2000-draw bootstrap reaches both ends
    assert ppo["diff"] == 0.0 and ppo["ci_low"] < 0 < ppo["ci_high"]
    dpo_vs_ppo = table.loc[("dpo-beta0.1", "ppo-kl0.05")]
    assert dpo_vs_ppo["diff"] == 0.25  # per prompt (+.75, −.25, +.75, −.25): mean +0.25


def test_summary_states_significance_in_numbers_and_claims_no_unsupported_winner():
    runs = _runs(EVALUATIONS, METHODS)
    differences = paired_differences(runs, EVALUATIONS, 1.0)
    text = " ".join(summary_sentences({"runs": runs, "differences": differences, "win_rates": pd.DataFrame(
        columns=["method"]), "compute_matched": pd.DataFrame(columns=["best_gold_reward"])}))
    assert "Significant at 95% (paired prompt-level bootstrap, CI excludes 0): dpo-beta0.1 − SFT +0.250 " \
           "[+0.250, +0.250]" in text
    assert "Not significant at 95% (CI includes 0): ppo-kl0.05 − SFT +0.000" in text
    # DPO − PPO per prompt (+.75, −.25, +.75, −.25): a resample of all four −.25 has probability 1/16 > 2.5%,
    # so the interval's low end is −0.25 and the summary must not name a winner
    assert "Best DPO minus best PPO (dpo-beta0.1 − ppo-kl0.05): +0.250 gold reward, paired 95% CI [-0.250, " in text
    assert "not significant at 95%: no winner" in text and "is ahead" not in text
    assert difference_sentences(pd.DataFrame(columns=["a", "b", "diff", "ci_low", "ci_high"])) == []


def test_differences_use_only_the_kl_temperature():
    hot = {run: pd.concat([frame, _samples({0: [9.0], 1: [9.0]}, temperature=0.5)]) if run == "SFT" else frame
           for run, frame in EVALUATIONS.items()}
    table = paired_differences(_runs(EVALUATIONS, METHODS), hot, 1.0)
    assert table.set_index(["a", "b"]).loc[("dpo-beta0.1", "SFT"), "diff"] == pytest.approx(0.25, abs=0)


def test_stage_table_useful_fraction_is_bench_seconds_over_wall_seconds():
    from types import SimpleNamespace

    from jobs.experiment.report import stage_table

    def stage(name, wall, trained, generated, skipped=False):
        return SimpleNamespace(name=name, skipped=skipped, compute={"wall_s": wall, "cpu_s": 0.0, "device_s": 0.0},
                               summary={"tokens_trained": trained, "tokens_generated": generated})

    rates = SimpleNamespace(train_tokens_per_s=100.0, generate_tokens_per_s=1000.0)
    stages = {"ppo": stage("ppo", 40.0, 1000, 10_000), "dpo": stage("dpo", 50.0, 2500, 0),
              "old": stage("old", 999.0, 1, 1, skipped=True)}
    table = stage_table(stages, rates).set_index("stage")
    # ppo: 1000/100 + 10000/1000 = 20 s of work in 40 s; dpo: 25 s in 50 s; the total counts stages run now only
    assert table.loc["ppo", "useful_fraction"] == pytest.approx(0.5, abs=1e-12)
    assert table.loc["dpo", "useful_fraction"] == pytest.approx(0.5, abs=1e-12)
    total = table.loc["total (stages run now)"]
    assert total["wall_s"] == 90.0 and total["tokens_trained"] == 3500
    assert total["useful_fraction"] == pytest.approx(45.0 / 90.0, abs=1e-12)


def test_only_the_dpo_vs_ppo_row_is_called_best_dpo_minus_best_ppo():
    """Best-of-N rows sit in the same differences table; the head-to-head sentence must not read them as
    DPO vs PPO (a significant best-of-8 − best-of-1 fall was once reported as "so PPO is ahead")."""
    runs = _runs(EVALUATIONS, METHODS)
    differences = pd.concat([paired_differences(runs, EVALUATIONS, 1.0), pd.DataFrame([
        {"a": "best-of-8", "b": "best-of-1", "temperature": 1.0, "diff": -0.042, "ci_low": -0.077, "ci_high": -0.002}])],
        ignore_index=True)
    sentences = summary_sentences({"runs": runs, "differences": differences, "win_rates": pd.DataFrame(
        columns=["method"]), "compute_matched": pd.DataFrame(columns=["best_gold_reward"])})
    head = [s for s in sentences if s.startswith("Best DPO minus best PPO")]
    assert len(head) == 1 and "(dpo-beta0.1 − ppo-kl0.05)" in head[0]
    assert not any("best-of" in s and "is ahead" in s for s in sentences)
    assert "best-of-8 − best-of-1 -0.042 [-0.077, -0.002]" in " ".join(sentences)


def test_compute_matched_ranking_names_a_leader_only_when_its_paired_lead_is_significant():
    """The demo's first full report said 'DPO reaches the highest gold reward' within the compute budget
    for 0.310 vs PPO-GT's 0.294 with overlapping intervals: a ranking of point estimates read as a result."""
    runs = _runs(EVALUATIONS, METHODS).assign(total_cpu_s=[0.0, 10.0, 10.0])
    table = compute_matched(runs, EVALUATIONS, 1.0)
    assert list(table["method"]) == ["DPO", "PPO"]
    # DPO − PPO per prompt (+.75, −.25, +.75, −.25): mean +0.25, the interval reaches −0.25 (see above)
    assert table.loc[0, "lead_over_next"] == 0.25 and table.loc[0, "lead_ci_low"] < 0
    assert pd.isna(table.loc[1, "lead_over_next"])
    text = " ".join(compute_matched_sentences(table))
    assert "DPO 0.438 (dpo-beta0.1); PPO 0.188 (ppo-kl0.05)" in text
    assert "DPO's lead over PPO: +0.250" in text and "no method is ahead within this budget" in text
    assert "so DPO is ahead" not in text
    # DPO vs SFT-like PPO shifted by a sure +0.25 on every prompt: significant, and said so
    sure = {**EVALUATIONS, "ppo-kl0.05": _samples(SFT)}
    text = " ".join(compute_matched_sentences(compute_matched(_runs(sure, METHODS).assign(
        total_cpu_s=[0.0, 10.0, 10.0]), sure, 1.0)))
    assert "DPO's lead over PPO: +0.250, paired 95% CI [+0.250, +0.250], significant at 95%, so DPO is ahead" in text
    assert compute_matched_sentences(compute_matched(runs[runs.method != "PPO"], EVALUATIONS, 1.0))[0].endswith(
        "only DPO has a run within it.")


def test_the_leader_is_compared_with_every_other_methods_best_run():
    """Three methods: GRPO (SFT + 0.5 on every prompt) leads; against DPO (+0.25 everywhere) its lead is a
    sure +0.25; against PPO (per prompt +1, 0, +1, 0) a resample of the two zero prompts only has probability
    1/16 > 2.5%, so that interval reaches 0 and the sentence must say the leader is not ahead of PPO."""
    evaluations = {**EVALUATIONS, "grpo-kl0.05": _samples({p: [g + 0.5 for g in golds] for p, golds in SFT.items()})}
    methods = {**METHODS, "grpo-kl0.05": "GRPO"}
    runs = _runs(evaluations, methods)
    differences = paired_differences(runs, evaluations, 1.0)
    table = differences.set_index(["a", "b"])
    assert tuple(table.loc[("grpo-kl0.05", "dpo-beta0.1"), ["diff", "ci_low", "ci_high"]]) == (0.25, 0.25, 0.25)
    vs_ppo = table.loc[("grpo-kl0.05", "ppo-kl0.05")]
    assert vs_ppo["diff"] == 0.5 and vs_ppo["ci_low"] == 0.0
    assert ("dpo-beta0.1", "ppo-kl0.05") in table.index and len(differences) == 3 + 3  # 3 vs SFT, DPO−PPO, 2 leads
    text = " ".join(summary_sentences({"runs": runs, "differences": differences, "win_rates": pd.DataFrame(
        columns=["method"]), "compute_matched": pd.DataFrame(columns=["best_gold_reward"])}))
    assert ("The highest-scoring run, grpo-kl0.05 (GRPO), against each other method's best run (paired 95% CI; "
            "the leader is chosen on these samples, so its leads lean optimistic): DPO (dpo-beta0.1) +0.250 "
            "[+0.250, +0.250], significant; PPO (ppo-kl0.05) +0.500 [+0.000, ") in text
    assert "not significant: it is not ahead of PPO at 95%." in text


def test_a_leader_pair_already_in_the_table_the_other_way_round_is_read_flipped():
    """When PPO leads (by point estimate, set here), its row against DPO is the head-to-head row best DPO −
    best PPO read the other way round: the difference and both ends change sign and swap."""
    evaluations = {**EVALUATIONS, "grpo-kl0.05": _samples({p: [g + 0.125 for g in golds] for p, golds in SFT.items()})}
    methods = {**METHODS, "grpo-kl0.05": "GRPO"}
    runs = _runs(evaluations, methods)
    runs.loc[runs["run"] == "ppo-kl0.05", "gold_reward"] = 9.0
    differences = paired_differences(runs, evaluations, 1.0)
    assert len(differences) == 3 + 2  # no second DPO/PPO row: the head-to-head one serves
    head = differences.set_index(["a", "b"]).loc[("dpo-beta0.1", "ppo-kl0.05")]
    text = " ".join(leader_sentences(runs, differences))
    assert (f"DPO (dpo-beta0.1) {-head['diff']:+.3f} [{-head['ci_high']:+.3f}, {-head['ci_low']:+.3f}], "
            f"not significant") in text and head["diff"] == 0.25
    # PPO − GRPO per prompt (−.625, +.375, −.625, +.375): mean −0.125
    assert "GRPO (grpo-kl0.05) -0.125 [" in text and "it is not ahead of DPO, GRPO at 95%." in text
