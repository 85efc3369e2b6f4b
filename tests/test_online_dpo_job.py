"""Online DPO (jobs.drivers.online_dpo) end to end on a local Ray cluster with the tiny model, and its labelling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actors.group import ActorCallError
from actors.math.online_pairs import best_worst_pairs
from jobs.drivers import online_dpo
from jobs.run import prompt_run
from jobs.drivers.online_dpo import OnlineDPOConfig, round_metrics, train
from jobs.run.config import ConfigError, build_config

VOLATILE = ("timing_s/", "perf/")  # wall-clock measurements differ between any two runs


def _config(out, *extra):
    return build_config(OnlineDPOConfig, "online_dpo_tiny", [f"output_dir={out}", *extra])


def _rows(run: Path, volatile: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows if volatile else [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def test_best_worst_pairs_by_hand():
    # three prompts of k = 3: a clear best and worst; a tie between the two best; everything tied
    scores = [0.2, 0.9, 0.1, 0.5, 0.5, 0.3, 0.4, 0.4, 0.4]
    assert best_worst_pairs(scores, [True] * 9, 3) == [(1, 2), (3, 5)]  # the first of tied bests; all-tied: none
    # an empty response does not compete: group 0 is left with rows 0 and 2, group 1 with row 3 alone
    usable = [True, False, True, True, False, False, True, True, True]
    assert best_worst_pairs(scores, usable, 3) == [(0, 2)]
    # min_gap: a gap of exactly min_gap is a tie (0.9 − 0.1 = 0.8 is kept, 0.5 − 0.3 = 0.2 is not)
    assert best_worst_pairs(scores, [True] * 9, 3, min_gap=0.25) == [(1, 2)]
    # the first of tied bests and of tied worsts; k = 2 groups
    assert best_worst_pairs([1.0, 1.0, 0.0, 2.0, 0.0, 0.0], [True] * 6, 3) == [(0, 2), (3, 4)]
    assert best_worst_pairs([0.0, 1.0, 2.0, -1.0], [True] * 4, 2) == [(1, 0), (2, 3)]
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        best_worst_pairs([1.0], [True], 1)
    with pytest.raises(ValueError, match="do not make groups of 2"):
        best_worst_pairs([1.0, 2.0, 3.0], [True] * 3, 2)


def test_round_metrics_average_the_steps_and_sum_the_tokens():
    steps = [{"loss": 0.7, "rewards/margins": 0.0, "tokens": 10.0, "lr": 1.0, "skipped_nonfinite": 0.0,
              "timing_s/update": 1.0},
             {"loss": 0.5, "rewards/margins": 0.4, "tokens": 10.0, "lr": 2.0, "skipped_nonfinite": 1.0,
              "timing_s/update": 2.0}]
    assert round_metrics(steps) == {"loss": pytest.approx(0.6), "rewards/margins": pytest.approx(0.2), "tokens": 20.0,
                                    "lr": 2.0, "skipped_nonfinite": 1.0, "timing_s/update": 3.0}
    assert round_metrics([]) == {"skipped_nonfinite": 0.0}


@pytest.mark.slow
def test_online_dpo_gt_raises_the_held_out_gold_reward(ray_cluster, tmp_path):
    summary = train(_config(tmp_path))
    rows = [r for r in _rows(tmp_path / "online_dpo_tiny", volatile=True) if r["step"] > 0]
    assert summary["roles"] == ["generator", "judge", "policy", "reference", "reward"]  # no critic
    start, end = summary["start"]["eval/gold_reward_mean"], summary["end"]["eval/gold_reward_mean"]
    # measured here (twice, identical: seeded): held-out gold reward 0.145 -> 0.426 in 8 rounds (KL 7.5 nats);
    # 0.25 leaves room on both sides
    assert start < 0.25 < end, (start, end)
    assert summary["tokens_generated"] > 0 and summary["tokens_trained"] > 0 and summary["pairs"] > 0
    assert Path(summary["checkpoint"], "model.safetensors").exists()
    for key in ("loss", "rewards/chosen", "rewards/margins", "reward/score_mean", "timing_s/generate",
                "timing_s/sync_weights"):
        assert all(key in r for r in rows), key
    assert all(r["reward/chosen_score_mean"] > r["reward/rejected_score_mean"] for r in rows)
    assert rows[0]["rewards/margins"] > 0  # the second step of round 1 already prefers the chosen samples


@pytest.mark.slow
def test_online_dpo_interrupted_then_resumed_equals_the_uninterrupted_run(ray_cluster, tmp_path):
    # round 1's reference log-probs are poisoned with NaN in both runs: the guard skips that update and counts it
    args = ["rounds=3", "checkpoint.every=2", "eval_prompts=4", "eval_scorer=null", "prompts_per_round=4",
            "faults.nan_at_steps=[1]"]
    full_summary = train(_config(tmp_path, "run_name=full", *args))
    with pytest.raises(ActorCallError, match="policy"):
        train(_config(tmp_path, "run_name=cut", *args, "faults.kill_at_step=policy@3", "faults.max_recoveries=0"))
    summary = train(_config(tmp_path, "run_name=cut", *args, "checkpoint.resume=latest"))
    assert summary["resumed_from"].endswith("step_000002")
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert json.dumps(full) == json.dumps(cut)  # bitwise: every metric of every round (NaN == NaN as text)
    assert full_summary["nonfinite_skipped_steps"] == [1] and summary["nonfinite_skipped_steps"] == [1]
    assert [r["skipped_nonfinite"] for r in full if r["step"] > 0] == [1.0, 0.0, 0.0]
    assert summary["tokens_trained"] == full_summary["tokens_trained"] > 0
    wa = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_smollm2_preset_builds():
    config = build_config(OnlineDPOConfig, "online_dpo_smollm2_vader", [])
    assert (config.model, config.reward.scorer, config.samples_per_prompt) == ("smollm2", "vader", 4)


@pytest.mark.parametrize("override, message", [
    (["samples_per_prompt=1"], "samples_per_prompt must be >= 2 (a pair needs a best and a worst sample), got 1"),
    (["dpo_steps_per_round=0"], "dpo_steps_per_round must be >= 1, got 0"),
    (["loss.variant=nope"], "loss.variant must be one of"),
    (["reward.kind=learned"], "reward.model is required when reward.kind is learned"),
])
def test_bad_online_dpo_config_is_rejected_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, *override)


def test_samples_per_prompt_1_is_one_line_on_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prompt_run, "init_ray", lambda *a, **k: pytest.fail("init_ray was called"))
    with pytest.raises(SystemExit) as caught:
        online_dpo.main(["--preset", "online_dpo_tiny", f"output_dir={tmp_path}", "samples_per_prompt=1"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("config error: samples_per_prompt must be >= 2 (a pair needs a best and a worst sample), "
                          "got 1 "), err
