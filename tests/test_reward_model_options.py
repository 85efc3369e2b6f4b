"""Reward-model options that change how it trains and reads out: score pooling and frozen lower layers."""

import pytest
import torch

from actors.math.batch import collate_pairs
from actors.math.ppo_math import pool_sequence_scores
from actors.models import ensure_tiny_llama, load_tokenizer
from actors.reward import RewardModelActor


def test_pool_sequence_scores_last_and_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 0.0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    response = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    assert pool_sequence_scores(values, attention, response, "last").tolist() == [4.0, 7.0]
    assert pool_sequence_scores(values, attention, response, "mean").tolist() == [3.5, 6.5]
    empty = pool_sequence_scores(values[:1], attention[:1], torch.zeros(1, 4, dtype=torch.long), "mean")
    assert empty.tolist() == [0.0]
    with pytest.raises(ValueError, match="unknown score pooling"):
        pool_sequence_scores(values, attention, response, "max")


def _pairs(tokenizer):
    prompt = tokenizer("the film", add_special_tokens=True)["input_ids"]
    chosen = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("was great fun", "moved me")]
    rejected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("was dull", "bored me to tears")]
    return collate_pairs([prompt, prompt], chosen, rejected, tokenizer.pad_token_id)


def test_frozen_lower_layers_do_not_move_and_the_rest_trains():
    path = str(ensure_tiny_llama())
    actor = RewardModelActor(kind="learned", model=path, freeze_layers=1, optimizer={"lr": 1e-2, "warmup_steps": 0})
    backbone = actor.model.backbone
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    assert any(n.startswith("embed_tokens") for n in frozen) and any(n.startswith("layers.0.") for n in frozen)
    assert not any(n.startswith("layers.1.") for n in frozen)
    trainable = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}
    actor.train_rm(_pairs(load_tokenizer(path)))
    after = dict(backbone.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in trainable.items())


def test_pooling_is_saved_with_the_head_and_a_mismatch_is_refused(tmp_path):
    path = str(ensure_tiny_llama())
    tokenizer = load_tokenizer(path)
    actor = RewardModelActor(kind="learned", model=path, pooling="mean", optimizer={"lr": 1e-3, "warmup_steps": 0})
    batch = _pairs(tokenizer)
    values = actor.model(batch["input_ids"], batch["attention_mask"])
    expected = pool_sequence_scores(values, batch["attention_mask"], batch["loss_mask"], "mean")
    chosen, rejected = actor._pair_scores(batch)
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=0, rtol=0)
    actor.save(str(tmp_path / "rm"))
    loaded = RewardModelActor(kind="learned", model=str(tmp_path / "rm"))
    assert loaded.model.pooling == "mean"
    with pytest.raises(ValueError, match="trained with pooling 'mean', not 'last'"):
        RewardModelActor(kind="learned", model=str(tmp_path / "rm"), pooling="last")
