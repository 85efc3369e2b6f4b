"""Best-of-N: the analytic KL and the subset estimator exactly, a lost generator shard re-run on a
survivor, and the job end to end on the tiny model with programmatic rewards."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from actors.math.best_of_n import best_of_n_kl, best_of_n_selection_weights, expected_best_of_n, n_values


def test_analytic_kl_exact_values():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(0.19314718055994530, abs=1e-15)  # log 2 - 1/2
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75, abs=1e-15)
    assert best_of_n_kl(128) == pytest.approx(7 * math.log(2) - 127 / 128, abs=1e-15)
    with pytest.raises(ValueError, match="N must be >= 1"):
        best_of_n_kl(0)


def test_n_values_are_powers_of_two_up_to_the_pool():
    assert n_values(1) == [1]
    assert n_values(16) == [1, 2, 4, 8, 16]
    assert n_values(12) == [1, 2, 4, 8, 12]


def _brute_force(selector, target, n):
    """Mean over every n-subset of the target of its highest-selector member (ties: their mean)."""
    values = []
    for subset in itertools.combinations(range(len(selector)), n):
        best = max(selector[i] for i in subset)
        values.append(np.mean([target[i] for i in subset if selector[i] == best]))
    return float(np.mean(values))


@pytest.mark.parametrize("selector", [[0.3, -1.0, 2.5, 0.7, 1.1, -0.2, 0.9],   # distinct
                                      [1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.5]])   # ties
def test_subset_estimator_equals_enumerating_every_subset(selector):
    target = [0.1, 0.9, -0.4, 0.6, 0.2, 0.8, -0.7]
    for n in range(1, len(selector) + 1):
        assert expected_best_of_n(selector, target, n) == pytest.approx(_brute_force(selector, target, n), abs=1e-12)


def test_subset_estimator_endpoints_and_weights():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=9)
    gold = rng.normal(size=9)
    assert best_of_n_selection_weights(9, 4).sum() == pytest.approx(1.0, abs=1e-12)
    assert expected_best_of_n(scores, gold, 1) == pytest.approx(gold.mean(), abs=1e-12)  # N=1: the base policy
    assert expected_best_of_n(scores, gold, 9) == pytest.approx(gold[scores.argmax()], abs=1e-12)
    oracle = [expected_best_of_n(gold, gold, n) for n in range(1, 10)]
    assert all(b >= a for a, b in zip(oracle, oracle[1:]))


def test_cli_shorthands_become_overrides():
    from jobs.drivers.best_of_n import _flags_to_overrides

    assert _flags_to_overrides(["--preset", "best_of_n_tiny", "--num-generators", "2", "--max-n=8", "seed=3"]) == [
        "--preset", "best_of_n_tiny", "num_generators=2", "max_n=8", "seed=3"]


def test_bad_best_of_n_config_is_rejected_naming_the_key():
    from jobs.drivers.best_of_n import BestOfNConfig
    from jobs.run.config import ConfigError, build_config

    for override, key in [("max_n=0", "max_n"), ("backend=tpu", "backend"), ("reward.kind=learned", "reward.model"),
                          ("temperature=0", "temperature"), ("split=test", "split")]:
        with pytest.raises((ConfigError, ValueError), match=key):
            build_config(BestOfNConfig, "best_of_n_tiny", [override])


def test_a_lost_generator_shard_is_rerun_on_a_survivor(ray_cluster, tiny_tokenizer):
    import ray

    from actors.generation import GenerationActor, generate_sharded
    from actors.sampling import SamplingConfig
    from actors.group import ActorCallError, ActorGroup, ActorResources

    prompts = [tiny_tokenizer(t)["input_ids"] for t in ["The film", "I went", "Honestly", "My friends", "A"]]
    sampling = SamplingConfig(n=2, max_new_tokens=6, seed=21)
    group = ActorGroup(GenerationActor, "bon-generator", num_actors=2, indexed_names=True,
                       resources=ActorResources(num_cpus=1, torch_threads=1), init_kwargs={"model": "tiny"})
    try:
        group.wait_ready()
        healthy = generate_sharded(group, prompts, sampling)
        ray.kill(group.actors[1], no_restart=True)
        with pytest.raises(ActorCallError, match="died"):
            generate_sharded(group, prompts, sampling)
        recovered = generate_sharded(group, prompts, sampling, retries=1)
    finally:
        group.shutdown()
    # The lost shard ran again with its own seed on generator 0: the samples are the same ones.
    assert [(c.prompt_index, c.sample_index) for c in recovered] == [(c.prompt_index, c.sample_index) for c in healthy]
    assert [c.response_ids for c in recovered] == [c.response_ids for c in healthy]


@pytest.mark.slow
def test_best_of_n_job_on_the_tiny_model(ray_cluster, tmp_path):
    from jobs.drivers.best_of_n import BestOfNConfig, train
    from jobs.run.config import build_config

    config = build_config(BestOfNConfig, "best_of_n_tiny", [f"output_dir={tmp_path}", "num_prompts=6", "max_n=8"])
    summary = train(config)
    folder = tmp_path / config.run_name
    table = pd.read_csv(folder / "best_of_n.csv")
    assert summary["csv"] == str(folder / "best_of_n.csv")
    assert table["n"].tolist() == [1, 2, 4, 8]
    assert table["kl_analytic"].tolist() == pytest.approx([best_of_n_kl(n) for n in (1, 2, 4, 8)], abs=1e-12)
    oracle = table["oracle_gold_reward"].tolist()
    assert all(b >= a - 1e-12 for a, b in zip(oracle, oracle[1:]))  # the oracle never gets worse with N
    assert oracle[-1] > oracle[0]
    # N=1 takes no decision: both curves are the pool's mean gold reward.
    assert table["gold_reward"][0] == pytest.approx(oracle[0], abs=1e-12)
    assert (table["oracle_gold_reward"] >= table["gold_reward"] - 1e-12).all()
    assert (folder / "best_of_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = pd.read_parquet(folder / "samples.parquet")
    assert len(samples) == 6 * 8 and set(samples["prompt_index"]) == set(range(6))
    # The table is recomputable from the stored samples.
    pool = samples.sort_values(["prompt_index", "sample_index"])
    gold = pool["gold_score"].to_numpy().reshape(6, 8)
    assert np.mean([expected_best_of_n(g, g, 8) for g in gold]) == pytest.approx(oracle[-1], abs=1e-9)
    assert (folder / "config.yaml").exists() and (folder / "metrics.csv").exists()
    assert json.loads((folder / "summary.json").read_text())["max_n"] == 8
