"""The actor-group contract: ``submit`` is a role's one answer, ``call_all`` every actor's, and an error
about a dead actor names that actor and its role whichever group's gather saw it (real Ray actors)."""
from __future__ import annotations

import os
import sys

import pytest
import ray
from ray import cloudpickle

from actors.group import ActorCallError, ActorGroup


# Ray workers cannot import this test module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Echo:
    def __init__(self, torch_threads=None, tag: str = ""):
        self.tag = tag

    def answer(self, x):
        return f"{self.tag}:{x}"

    def die(self):
        os._exit(1)


def test_submit_is_the_single_actors_answer_and_call_all_every_actors(ray_cluster):
    one = ActorGroup(Echo, "judge", init_kwargs={"tag": "j"})
    many = ActorGroup(Echo, "generator", num_actors=2, init_kwargs={"tag": "g"})
    try:
        assert ray.get(one.submit("answer", 1)) == "j:1"
        assert one.run_one("answer", 2) == "j:2"
        assert ray.get(many.call_all("answer", 3)) == ["g:3", "g:3"]
        with pytest.raises(ValueError, match="generator.answer: submit needs a one-actor role, this one has 2"):
            many.submit("answer", 4)
    finally:
        one.shutdown()
        many.shutdown()


def test_a_dead_actor_is_named_by_its_own_role_when_another_group_awaits_it(ray_cluster):
    policy = ActorGroup(Echo, "policy", init_kwargs={"tag": "p"})
    critic = ActorGroup(Echo, "critic", init_kwargs={"tag": "c"})
    try:
        refs = [policy.submit("answer", 1), critic.submit("die")]
        # Awaited through the policy's group, as a PPO step awaits all roles' refs together.
        with pytest.raises(ActorCallError, match="policy.step: actor 'critic' of role 'critic' died"):
            policy.get(refs, "step", timeout_s=120)
    finally:
        policy.shutdown()
        critic.shutdown()
