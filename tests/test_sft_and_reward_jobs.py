"""jobs.sft and jobs.reward end to end on a local Ray cluster with the tiny model, plus their exact pieces."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.math.batch import collate_pairs, collate_sequences
from actors.critic import CriticActor
from actors.policy import PolicyActor
from actors.reward import RewardModelActor
from actors.value_model import ScalarHeadModel
from jobs.run.config import ConfigError, build_config
from jobs.drivers.ppo import PPOConfig
from jobs.drivers.ppo import train as train_ppo
from jobs.drivers.reward import RewardTrainConfig
from jobs.drivers.reward import train as train_reward
from jobs.drivers.sft import SFTConfig
from jobs.drivers.sft import train as train_sft


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# -- SFT ------------------------------------------------------------------------------------------
def test_sft_loss_counts_response_tokens_only(tiny_tokenizer):
    """train_sft's loss is the mean NLL of the loss-masked tokens: changing the prompt's tokens'
    targets changes nothing, and the value equals a hand computation from the model's logits."""
    policy = PolicyActor("tiny", optimizer={"lr": 1e-12}, torch_threads=1)
    prompts, responses = [[5, 6, 7, 8], [9, 10]], [[11, 12, 2], [13, 2]]
    batch = collate_sequences(prompts, responses, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        mask = batch["loss_mask"][:, 1:].float()
        expected = float(-(logp * mask).sum() / mask.sum())
    evaluated = policy.eval_sft(batch)
    assert evaluated["response_tokens"] == 5.0
    assert evaluated["nll_sum"] / evaluated["response_tokens"] == pytest.approx(expected, rel=1e-5)
    metrics = policy.train_sft(batch, micro_batch_size=2)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_preferred_ft_lowers_held_out_nll_and_saves_a_loadable_model(ray_cluster, tmp_path):
    config = build_config(SFTConfig, "sft_tiny", [f"output_dir={tmp_path}"])
    summary = train_sft(config)
    assert summary["end"]["eval/nll"] < summary["start"]["eval/nll"] - 1.0
    folder = tmp_path / config.run_name
    assert (folder / "config.yaml").exists() and (folder / "checkpoint" / "config.yaml").exists()
    assert AutoModelForCausalLM.from_pretrained(folder / "checkpoint").config.num_hidden_layers == 2
    rows = _rows(folder)
    assert rows[0]["step"] == 0 and "eval/nll" in rows[0] and "loss" in rows[1] and "timing_s/step" in rows[1]


@pytest.mark.slow
def test_sft_on_imdb_continuations(ray_cluster, tmp_path):
    config = build_config(SFTConfig, "sft_tiny", [f"output_dir={tmp_path}", "target=continuation", "max_steps=3",
                                                  "data.train=imdb:tests/fixtures/imdb.csv", "batch_size=4",
                                                  "micro_batch_size=4"])
    summary = train_sft(config)
    assert summary["train_examples"] >= 5 and summary["end"]["eval/nll"] < summary["start"]["eval/nll"]


def test_sft_continuation_needs_an_imdb_source(ray_cluster, tmp_path):
    config = build_config(SFTConfig, "sft_tiny", [f"output_dir={tmp_path}", "target=continuation"])
    with pytest.raises(ConfigError, match="continuation"):
        train_sft(config)


def test_sft_rejects_an_unknown_target():
    with pytest.raises(ConfigError, match="target"):
        build_config(SFTConfig, "sft_tiny", ["target=rejected_please"])


# -- reward model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    config = build_config(RewardTrainConfig, "reward_tiny", [f"output_dir={out}"])
    return config, train_reward(config), out / config.run_name


@pytest.mark.slow
def test_reward_model_separates_held_out_pairs(reward_run):
    _, summary, folder = reward_run
    assert summary["eval_pairs"] >= 15
    assert summary["end"]["eval/accuracy"] > 0.9
    assert summary["end"]["eval/margin"] > 0
    rows = _rows(folder)
    assert {"loss", "accuracy", "reward/chosen", "reward/rejected", "grad_norm"} <= set(rows[1])


@pytest.mark.slow
def test_reward_normalisation_is_stored_and_applied(reward_run, tiny_tokenizer):
    _, summary, folder = reward_run
    norm = summary["normalization"]
    assert norm["samples"] == 16 and norm["reward_std"] > 0
    saved = ScalarHeadModel.from_pretrained(str(folder / "checkpoint"))
    assert (saved.reward_mean, saved.reward_std) == pytest.approx((norm["reward_mean"], norm["reward_std"]))
    actor = RewardModelActor(kind="learned", model=str(folder / "checkpoint"), torch_threads=1)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 2], [12, 2]]
    normalised = actor.score(prompts, responses)["scores"]
    actor.set_normalization(0.0, 1.0)
    raw = actor.score(prompts, responses)["scores"]
    assert torch.allclose(normalised, (raw - norm["reward_mean"]) / norm["reward_std"], atol=1e-5)


def test_bradley_terry_step_matches_the_formula(tiny_tokenizer):
    """train_rm's loss is mean −log σ(r_w − r_l − margin) with r read at the last real token."""
    actor = RewardModelActor(kind="learned", model="tiny", torch_threads=1, optimizer={"lr": 1e-12})
    batch = collate_pairs([[5, 6], [7, 8, 9]], [[10, 2], [11, 12, 2]], [[13, 14, 15, 2], [16, 2]],
                          tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        values = actor.model(batch["input_ids"], batch["attention_mask"])
        last = batch["attention_mask"].sum(-1) - 1  # right padding: last real token
        scores = values[torch.arange(4), last]
    expected = float(-torch.nn.functional.logsigmoid(scores[:2] - scores[2:] - 0.5).mean())
    metrics = actor.train_rm(batch, margin=0.5, micro_batch_size=1)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["accuracy"] == float((scores[:2] > scores[2:]).float().mean())


# -- PPO with the learned reward -----------------------------------------------------------------
@pytest.mark.slow
def test_ppo_with_a_learned_reward_model(reward_run, tmp_path):
    """The critic starts as the reward model with its normalisation folded into the head (w/σ, (b − μ)/σ),
    so it predicts on the scale of PPO's normalised rewards, and PPO runs on those scores."""
    _, summary, folder = reward_run
    checkpoint = str(folder / "checkpoint")
    critic = CriticActor(checkpoint, torch_threads=1)
    reward = ScalarHeadModel.from_pretrained(checkpoint)
    assert reward.reward_std != 1.0 and reward.reward_mean != 0.0  # the fold below is not the identity
    # The same float32 operations as the fold, so equality is exact.
    assert torch.equal(critic.model.head.weight, reward.head.weight / reward.reward_std)
    assert torch.equal(critic.model.head.bias, (reward.head.bias - reward.reward_mean) / reward.reward_std)
    assert (critic.model.reward_mean, critic.model.reward_std) == (0.0, 1.0)
    config = build_config(PPOConfig, "ppo_tiny", [f"output_dir={tmp_path}", "steps=4", "eval_every=0",
                                                  "reward.kind=learned", f"reward.model={checkpoint}"])
    result = train_ppo(config)
    rows = [r for r in _rows(tmp_path / config.run_name) if r["step"] > 0]
    assert len(rows) == 4 and result["end"]["eval/gold_reward_mean"] == result["end"]["eval/gold_reward_mean"]
    for row in rows:
        assert all(row[k] == row[k] for k in ("reward/score_mean", "critic/vf_loss", "objective/kl"))
        assert row["actor/ratio_max_dev_first_minibatch"] == 0.0
