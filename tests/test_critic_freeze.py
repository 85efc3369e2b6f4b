"""critic.freeze_layers (issue 18: a cheaper PPO step): the critic's embeddings and lowest K decoder layers
stay frozen, so they get no gradients, no optimizer state and no updates, while the forward pass (the
values before training) is unchanged; and the role options that reach the actors are checked at config time."""

from __future__ import annotations

import pytest
import torch

from actors.critic import CriticActor
from actors.math.batch import collate_sequences
from jobs.run.cluster import TrainingRoleConfig
from jobs.run.config import ConfigError


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (4, 6, 3, 5)]
    responses = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (5, 3, 6, 4)]
    return collate_sequences(prompts, responses, 0)


def _snapshot(critic):
    return {name: p.detach().clone() for name, p in critic.model.named_parameters()}


def test_frozen_lower_layers_do_not_train_and_the_forward_is_unchanged(batch):
    plain = CriticActor("tiny", torch_threads=1, micro_batch_size=4)
    frozen = CriticActor("tiny", torch_threads=1, micro_batch_size=4, freeze_layers=1)
    assert frozen.info()["trainable_parameters"] < plain.info()["trainable_parameters"]
    # Same weights, same head init (seed 0): freezing changes no value before an update.
    before = frozen.values(batch)["values"]
    assert torch.equal(before, plain.values(batch)["values"])
    # The optimizer holds only the trainable parameters.
    in_optimizer = {id(p) for group in frozen.optimizer.param_groups for p in group["params"]}
    assert all((id(p) in in_optimizer) == p.requires_grad for p in frozen.model.parameters())

    start = _snapshot(frozen)
    returns = torch.randn(before.shape, generator=torch.Generator().manual_seed(1)) * batch["loss_mask"][:, 1:]
    frozen.train_value(batch, before, returns, {"epochs": 2, "minibatch_size": 4, "micro_batch_size": 4})
    after = _snapshot(frozen)
    moved = {name for name in start if not torch.equal(start[name], after[name])}
    lower = {name for name in start if "embed_tokens" in name or ".layers.0." in name}
    assert lower and not (moved & lower)  # embeddings and layer 0: untouched
    assert any(".layers.1." in name for name in moved) and any(name.startswith("head") for name in moved)
    assert not torch.equal(frozen.values(batch)["values"], before)  # and the critic did learn


def test_freeze_layers_is_the_critics_option_and_threads_are_checked():
    TrainingRoleConfig(freeze_layers=2).validate("critic", ("policy",))
    assert TrainingRoleConfig(freeze_layers=2).actor_options()["freeze_layers"] == 2
    assert "freeze_layers" not in TrainingRoleConfig().actor_options()  # unset: actors see no new keyword
    with pytest.raises(ConfigError, match="policy.freeze_layers"):
        TrainingRoleConfig(freeze_layers=2).validate("policy")
    with pytest.raises(ConfigError, match="single-actor critic"):
        TrainingRoleConfig(freeze_layers=2, num_workers=2).validate("critic", ("policy",))
    with pytest.raises(ConfigError, match="critic.freeze_layers must be >= 0"):
        TrainingRoleConfig(freeze_layers=-1).validate("critic")
    with pytest.raises(ConfigError, match="policy.torch_threads"):
        TrainingRoleConfig(torch_threads=0).validate("policy")
