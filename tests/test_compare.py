"""jobs.compare end to end on the tiny preset: every stage runs, the report's numbers come from the
saved samples, and a rerun with nothing changed skips every stage."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from actors.scorers import build_scorer
from jobs.drivers.compare import CompareConfig, method_section, run_experiment
from jobs.run.config import ConfigError, build_config
from jobs.experiment.preference_data import label_pairs
from jobs.experiment.differences import compute_matched


@pytest.fixture(scope="module")
def comparison(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    config = build_config(CompareConfig, "compare_tiny", [f"output_dir={out}"])
    result = run_experiment(config)
    return config, result, out / config.run_name


# The fixture runs the whole tiny comparison (every method kind, snapshots, evaluation) inside this
# test's setup: about 10 minutes on CI's quiet 2-core machine, more on a loaded one, so it gets more
# than the suite's default 900 s.
@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_every_stage_runs_and_the_report_has_its_plots(comparison):
    config, result, root = comparison
    expected = {"sft", "preference_data", "reward", "ppo-kl0.05", "ppo-kl0.5", "ppo-gt-kl0.5", "dpo-beta0.1",
                "dpo-beta0.5", "preferred-ft", "grpo-kl0.05", "online-dpo-beta0.1", "best-of-n",
                "eval-ppo-kl0.05@1", "eval-dpo-beta0.1@2"}
    assert expected <= set(result["stages"])
    assert not any(result["stages"].values())  # first run: nothing skipped
    page = (root / "report.html").read_text()
    images = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert {title for title, _ in images} == {"Reward–KL frontier", "Win rate vs temperature", "Reward vs compute",
                                              "Best-of-N vs N"}
    assert all(len(data) > 1000 for _, data in images)
    for name in ("runs", "win_rates", "compute_matched", "stages", "best_of_n", "differences"):
        assert (root / "tables" / f"{name}.csv").exists() and (root / "tables" / f"{name}.parquet").exists()
    runs = pd.read_csv(root / "tables" / "runs.csv")
    # every method lands in the same table, snapshots as runs of their own with their step
    assert {"SFT", "PPO", "PPO-GT", "DPO", "Preferred-FT", "GRPO", "Online DPO"} <= set(runs["method"])
    assert runs.set_index("run").loc["ppo-kl0.05@1", "step"] == 1
    differences = pd.read_csv(root / "tables" / "differences.csv")
    assert list(differences.columns) == ["a", "b", "temperature", "diff", "ci_low", "ci_high"]
    assert {("grpo-kl0.05", "SFT"), ("online-dpo-beta0.1", "SFT"), ("best-of-4", "best-of-1")} <= \
        set(zip(differences["a"], differences["b"]))
    import json as _json

    rm = _json.loads((root / "tables" / "reward_model.json").read_text())
    assert {"accuracy", "spearman", "eval_pairs", "train_pairs"} <= set(rm)
    stages = pd.read_csv(root / "tables" / "stages.csv")
    assert "useful_fraction" in stages.columns and stages["stage"].iloc[-1].startswith("total")
    # the total row must not turn the flag into a number (pyarrow then refused the column in stages.parquet)
    assert stages["skipped"].dtype == bool and (root / "tables" / "stages.parquet").exists()
    # the compute ledger counts every training stage's tokens (the critic-free drivers once reported none)
    trained = stages.set_index("stage").loc[["sft", "reward", "ppo-kl0.05", "ppo-gt-kl0.5", "dpo-beta0.1",
                                              "preferred-ft", "grpo-kl0.05", "online-dpo-beta0.1"], "tokens_trained"]
    assert (trained > 0).all(), trained
    summary = (root / "summary.txt").read_text()
    assert "SFT policy scores" in summary and "Best DPO minus best PPO" in summary
    assert "against each other method's best run" in summary  # more than two methods: the leader's row


@pytest.mark.slow
def test_report_numbers_are_recomputed_from_the_saved_samples(comparison):
    config, _, root = comparison
    runs = pd.read_csv(root / "tables" / "runs.csv").set_index("run")
    scorer = build_scorer(config.gold_scorer)
    for folder in sorted((root / "stages").glob("eval-*")):
        run = folder.name[len("eval-"):].rsplit("-", 1)[0]
        samples = pd.read_parquet(folder / "samples.parquet")
        at = samples[samples["temperature"] == config.eval.kl_temperature]
        # The gold reward again, from the saved text and ids, by a fresh scorer in this process
        # (the judge actor returns float32 scores, hence the float32-sized tolerance).
        gold = scorer(list(at["prompt"]), list(at["response"]), [list(r) for r in at["response_ids"]])
        assert np.mean(gold) == pytest.approx(runs.loc[run, "gold_reward"], abs=1e-6)
        kl = (at["logp_policy"] - at["logp_reference"]).mean()
        assert kl == pytest.approx(runs.loc[run, "kl"], abs=1e-9)
        # exact KL: a sum of per-position KLs, never negative, inside its own prompt-level interval
        assert (at["kl_exact"] >= 0).all()
        assert at["kl_exact"].mean() == pytest.approx(runs.loc[run, "kl_exact"], abs=1e-9)
        assert runs.loc[run, "kl_exact_ci_low"] <= runs.loc[run, "kl_exact"] <= runs.loc[run, "kl_exact_ci_high"]
    assert runs.loc["SFT", "kl"] == 0.0  # the reference is the SFT policy itself
    assert runs.loc["SFT", "kl_exact"] == 0.0
    wins = pd.read_csv(root / "tables" / "win_rates.csv")
    assert set(wins["temperature"]) == set(config.eval.temperatures)
    assert (wins[wins.run == "SFT"]["win_rate"] == 0.5).all()  # against itself: every comparison a tie


@pytest.mark.slow
def test_rerun_skips_every_finished_stage(comparison):
    config, first, root = comparison
    again = run_experiment(config)
    assert set(again["stages"]) == set(first["stages"])
    assert all(again["stages"].values())
    assert (root / "tables" / "runs.csv").exists()


def test_label_pairs_takes_every_pair_with_the_higher_score_chosen():
    rows = label_pairs("p", ["a", "b", "c", "d"], [0.1, 0.9, 0.5, 0.5])
    assert len(rows) == 5  # 6 pairs, minus the tie between c and d
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert {(r["chosen"], r["rejected"]) for r in rows} == {("b", "a"), ("c", "a"), ("d", "a"), ("b", "c"), ("b", "d")}
    assert len(label_pairs("p", ["a", " "], [0.0, 1.0])) == 0  # an empty reply is never part of a pair


def test_compute_matched_budget_gives_every_method_a_run():
    runs = pd.DataFrame([
        {"run": "sft", "method": "SFT", "total_cpu_s": 0.0, "gold_reward": 0.1, "gold_reward_ci_low": 0.0,
         "gold_reward_ci_high": 0.2, "kl": 0.0, "kl_exact": 0.0},
        {"run": "ppo-a", "method": "PPO", "total_cpu_s": 100.0, "gold_reward": 0.3, "gold_reward_ci_low": 0.2,
         "gold_reward_ci_high": 0.4, "kl": 2.0, "kl_exact": 2.0},
        {"run": "ppo-b", "method": "PPO", "total_cpu_s": 300.0, "gold_reward": 0.6, "gold_reward_ci_low": 0.5,
         "gold_reward_ci_high": 0.7, "kl": 5.0, "kl_exact": 5.0},
        {"run": "dpo-a", "method": "DPO", "total_cpu_s": 50.0, "gold_reward": 0.4, "gold_reward_ci_low": 0.3,
         "gold_reward_ci_high": 0.5, "kl": 1.0, "kl_exact": 1.0},
    ])
    table = compute_matched(runs).set_index("method")
    assert table.loc["PPO", "budget_cpu_s"] == 100.0  # the largest of the cheapest runs (PPO's 100 vs DPO's 50)
    assert table.loc["PPO", "best_run"] == "ppo-a" and table.loc["DPO", "best_run"] == "dpo-a"
    assert list(table.index) == ["DPO", "PPO"]  # sorted by the best reward within budget


def test_compare_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="dpo_betas"):
        build_config(CompareConfig, "compare_tiny", ["dpo_betas=[0.1,-1]"])
    with pytest.raises(ConfigError, match="ppo_kl_coefs is empty but methods includes ppo"):
        build_config(CompareConfig, "compare_tiny", ["dpo_betas=[]", "ppo_kl_coefs=[]"])
    with pytest.raises(ConfigError, match="nothing to compare"):
        build_config(CompareConfig, "compare_tiny", ["methods=[best_of_n]"])
    with pytest.raises(ConfigError, match=r"methods: unknown \['ppoo'\]"):
        build_config(CompareConfig, "compare_tiny", ["methods=[ppoo,dpo]"])
    # a sweep a chosen method does not use may be empty
    build_config(CompareConfig, "compare_tiny", ["methods=[dpo]", "ppo_kl_coefs=[]"])


@pytest.mark.slow
def test_report_renders_in_headless_chromium(comparison, tmp_path):
    """Skipped where no headless Chromium is installed (CI's image has none; see README)."""
    from jobs.check_report import check_report, find_browser

    if find_browser() is None:
        pytest.skip("no headless Chromium on this machine")
    _, _, root = comparison
    result = check_report(root / "report.html", tmp_path / "report.png")
    assert result["ok"], result
    assert {i["alt"] for i in result["images"]} >= {"Reward–KL frontier", "Best-of-N vs N"}
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.parametrize("preset", ["demo", "compare_methods", "compare_tiny", "compare_imdb", "compare_tldr", "compare_hh"])
def test_every_compare_preset_and_its_stage_configs_validate(preset):
    """The GPU presets cannot run here; their configs, and the job config each stage would build from
    them, are checked exactly as a run would check them before starting any actor."""
    import dataclasses

    from jobs.drivers.best_of_n import BestOfNConfig
    from jobs.drivers.dpo import DPOConfig
    from jobs.drivers.online_dpo import OnlineDPOConfig
    from jobs.drivers.policy_gradient import PolicyGradientConfig
    from jobs.drivers.ppo import PPOConfig
    from jobs.drivers.reward import RewardTrainConfig
    from jobs.drivers.sft import SFTConfig
    from jobs.experiment.stages import job_config

    config = build_config(CompareConfig, preset)
    pairs = {"train": "jsonl:pairs.jsonl", "eval_fraction": 0.1}
    prompts = dataclasses.asdict(config.prompts)
    gold = {"kind": "gold", "scorer": config.gold_scorer}
    if config.sft is not None:
        job_config(SFTConfig, {"model": config.model}, config.sft)
    job_config(RewardTrainConfig, {"model": config.model, "data": pairs}, config.reward)
    ppo = job_config(PPOConfig, {"model": config.model, "data": prompts, "reward": gold}, config.ppo)
    assert ppo.kl.coef > 0
    if "ppo_gt" in config.methods:
        job_config(PPOConfig, {"model": config.model, "data": prompts, "reward": gold}, method_section(config, "ppo_gt"))
    job_config(DPOConfig, {"model": config.model, "data": pairs}, config.dpo)
    job_config(SFTConfig, {"model": config.model, "data": pairs, "target": "chosen"}, config.preferred_ft)
    job_config(BestOfNConfig, {"model": config.model, "gold_scorer": config.gold_scorer, "reward": gold},
               config.best_of_n)
    for method in {"rloo", "grpo", "dr_grpo", "reinforce_pp"} & set(config.methods):
        job_config(PolicyGradientConfig, {"model": config.model, "data": prompts, "reward": gold,
                                          "advantage": method}, config.policy_gradient)
    if {"online_dpo", "online_dpo_gt"} & set(config.methods):
        job_config(OnlineDPOConfig, {"model": config.model, "data": prompts, "reward": gold}, config.online_dpo)
    assert config.dpo_betas and config.ppo_kl_coefs


@pytest.mark.parametrize("override, message", [
    ("dpo.betaa=0.1", "unknown config key 'dpo.betaa'"),
    ("ppo.kl.coeff=0.1", "unknown config key 'ppo.kl.coeff'"),
    ("reward.lr=0.1", "unknown config key 'reward.lr'"),
    ("best_of_n.nn=3", "unknown config key 'best_of_n.nn'"),
    ("dpo.loss.beta=abc", "dpo.loss.beta: expected a number"),
])
def test_every_stage_section_is_checked_when_the_config_is_built(override, message):
    # build_config is what the CLI runs before init_ray: the error comes before any stage or actor
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(CompareConfig, "compare_tiny", [override])
    build_config(CompareConfig, "compare_tiny", ["dpo.loss.beta=0.2"])  # a good key in the same place passes


def test_the_ppo_gt_section_changes_ppo_gts_runs_and_nothing_else():
    from jobs.drivers.ppo import PPOConfig
    from jobs.experiment.stages import job_config

    config = build_config(CompareConfig, "compare_tiny", ["ppo.snapshot_steps=[1]", "ppo.ppo.epochs=3",
                                                          "ppo_gt.snapshot_steps=[]", "ppo_gt.optimizer.lr=0.001"])
    base = {"model": "tiny", "data": {"train": "demo"}, "reward": {"kind": "gold", "scorer": "vader"}}
    ppo = job_config(PPOConfig, base, method_section(config, "ppo"))
    gt = job_config(PPOConfig, base, method_section(config, "ppo_gt"))
    assert (ppo.snapshot_steps, gt.snapshot_steps) == ([1], [])
    assert gt.optimizer.lr == 0.001 and ppo.optimizer.lr != 0.001
    assert gt.ppo.epochs == ppo.ppo.epochs == 3  # what ppo_gt leaves alone comes from the ppo section
    assert gt.tokenize == ppo.tokenize
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'ppo_gt.snapshot_step'")):
        build_config(CompareConfig, "compare_tiny", ["ppo_gt.snapshot_step=[]"])


def test_a_sections_torch_threads_wins_over_the_comparisons_and_nothing_else_does():
    from jobs.drivers.dpo import DPOConfig
    from jobs.experiment.stages import job_config

    base = {"model": "tiny", "seed": 3, "torch_threads": 1, "data": {"train": "jsonl:pairs.jsonl"}}
    # a stage whose actors work one at a time may take every core; the experiment's own choices still win
    config = job_config(DPOConfig, base, {"torch_threads": 2, "seed": 9})
    assert (config.torch_threads, config.seed) == (2, 3)
    assert job_config(DPOConfig, base, {}).torch_threads == 1
    assert job_config(DPOConfig, {**base, "torch_threads": None}, {"torch_threads": 2}).torch_threads == 2


@pytest.mark.parametrize("overrides, expected", [(["torch_threads=1", "eval.torch_threads=2"], 2),
                                                 (["torch_threads=1"], 1)])
def test_eval_torch_threads_reach_the_evaluator(monkeypatch, tmp_path, overrides, expected):
    from jobs.drivers import compare
    from jobs.experiment.stages import StageRunner

    seen = {}

    class Recorder:  # stands in for PolicyEvaluator: records what it was built with, evaluates nothing
        def __init__(self, reference, config, judge, *, torch_threads, backend, generation_options):
            seen["torch_threads"] = torch_threads

        def evaluate(self, *args, **kwargs):
            raise RuntimeError("recorded")

        def shutdown(self):
            pass

    class Judge:
        def shutdown(self):
            pass

    monkeypatch.setattr(compare, "PolicyEvaluator", Recorder)
    monkeypatch.setattr(compare, "gold_judge", lambda *a: Judge())
    config = build_config(CompareConfig, "compare_tiny", [f"output_dir={tmp_path}", *overrides])
    policies = {"SFT": {"checkpoint": "tiny"}}
    with pytest.raises(RuntimeError, match="recorded"):
        compare.evaluate_all(StageRunner(tmp_path), config, policies, "tiny", [[1, 2, 3]])
    assert seen["torch_threads"] == expected
