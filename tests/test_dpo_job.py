"""DPO end to end on a local Ray cluster with the tiny model (jobs.dpo's real driver)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from jobs.run.config import ConfigError, build_config
from jobs.drivers.dpo import DPOConfig, train

# Recorded from a run of the dpo_tiny preset (seed 0): the training-curve regression check.
RECORDED_LOSSES = [0.6931, 0.6494, 0.6176, 0.6228, 0.5645, 0.4899, 0.4429, 0.4212, 0.3669, 0.3693]


def _config(tmp_path, *overrides):
    return build_config(DPOConfig, "dpo_tiny", [f"output_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def dpo_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    config = build_config(DPOConfig, "dpo_tiny", [f"output_dir={out}"])
    summary = train(config)
    rows = [json.loads(line) for line in (out / config.run_name / "metrics.jsonl").read_text().splitlines()]
    return config, summary, rows, out / config.run_name


def test_dpo_learns_a_distinguishable_preference(dpo_run):
    _, summary, rows, _ = dpo_run
    assert len(rows) >= 30
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first
    assert summary["eval/rewards/accuracies"] > 0.9
    assert summary["eval/rewards/margins"] > 0


def test_dpo_metrics_use_the_standard_names(dpo_run):
    _, _, rows, _ = dpo_run
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "timing_s/step", "perf/tokens_per_s"):
        assert key in rows[0], key
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=0.02)  # policy == reference at step 1: log 2


def test_dpo_writes_a_loadable_checkpoint_config_and_csv(dpo_run):
    config, summary, _, folder = dpo_run
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json"):
        assert (folder / name).exists(), name
    assert list((folder / "tensorboard").iterdir())
    checkpoint = folder / "checkpoint"
    assert (checkpoint / "config.yaml").exists()
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.config.num_hidden_layers == 2


def test_dpo_training_curve_is_reproduced(dpo_run, tmp_path):
    """A second run with the same config gives the same losses (CPU, fixed seed, cached reference)."""
    config, _, rows, _ = dpo_run
    again = build_config(DPOConfig, "dpo_tiny", [f"output_dir={tmp_path}", "max_steps=8"])
    train(again)
    rerun = [json.loads(line) for line in (tmp_path / again.run_name / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rerun] == pytest.approx([r["loss"] for r in rows[:8]], abs=1e-5)
    assert [r["loss"] for r in rows[: len(RECORDED_LOSSES)]] == pytest.approx(RECORDED_LOSSES, abs=1e-3)


def test_reference_free_variant_needs_no_reference(ray_cluster, tmp_path):
    import ray

    config = _config(tmp_path, "loss.variant=simpo", "loss.beta=2.0", "max_steps=3")
    summary = train(config)
    assert summary["reference_s"] == 0.0
    assert summary["steps"] == 3
    names = [a["name"] for a in ray.util.state.list_actors() if a["state"] == "ALIVE"] if hasattr(ray.util, "state") else []
    assert "reference" not in names


@pytest.mark.parametrize("override, key", [
    ("loss.beta=0", "loss.beta"), ("loss.variant=magic", "loss.variant"), ("batch_size=0", "batch_size"),
    ("optimizer.lr=-1", "optimizer.lr"), ("model=./missing/model", "model"), ("bogus=1", "bogus"),
    ("loss.beta=high", "loss.beta"),
])
def test_bad_config_is_rejected_naming_the_key(tmp_path, override, key):
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        _config(tmp_path, override)


def test_on_the_fly_reference_matches_precomputed_and_stays_frozen(dpo_run, tmp_path):
    from actors.models import load_causal_lm

    _, _, rows, _ = dpo_run
    config = _config(tmp_path, "reference_mode=on_the_fly", "max_steps=4")
    summary = train(config)
    rerun = [json.loads(line) for line in (tmp_path / config.run_name / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rerun] == pytest.approx([r["loss"] for r in rows[:4]], abs=1e-4)
    frozen = load_causal_lm("tiny")
    expected = float(sum(p.detach().double().sum() for p in frozen.parameters()))
    assert summary["reference_checksum_end"] == pytest.approx(expected, abs=0)


def test_short_run_precomputes_only_the_pairs_its_steps_draw(dpo_run, tmp_path):
    """A 4-step run asks the reference for the pairs its 4 batches draw, not the whole set, and trains
    exactly as the full run's first 4 steps. Tolerance: the reference sums come from different chunks
    (other padding partners), which moves fp32 sums of ~20 log-probs by ~1e-6; 1e-4 on the loss is far above."""
    _, full, rows, _ = dpo_run
    config = _config(tmp_path, "max_steps=4")
    summary = train(config)
    assert summary["reference_pairs"] <= 4 * config.batch_size < summary["train_pairs"]
    assert summary["reference_pairs"] < full["reference_pairs"] <= full["train_pairs"]
    rerun = [json.loads(line) for line in (tmp_path / config.run_name / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rerun] == pytest.approx([r["loss"] for r in rows[:4]], abs=1e-4)


def test_bf16_autocast_step_runs_and_stays_close(ray_cluster, tmp_path):
    config = _config(tmp_path, "autocast_bf16=true", "max_steps=2", "eval_every=0")
    summary = train(config)
    assert summary["final"]["loss"] == pytest.approx(0.65, abs=0.1)
