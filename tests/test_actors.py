"""The actor fleet on a real local Ray cluster with the tiny Llama."""

from __future__ import annotations

import pytest
import torch

from actors.math.batch import collate_sequences
from actors.critic import CriticActor
from actors.generation import GenerationActor, generate_sharded
from actors.sampling import SamplingConfig
from actors.group import ActorCallError, ActorGroup, ActorResources
from actors.models import ModelNotFoundError, resolve_model_path
from actors.policy import PolicyActor
from actors.reference import ReferenceActor
from actors.reward import RewardModelActor

ONE_THREAD = ActorResources(num_cpus=1, torch_threads=1)


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    groups = {
        "policy": ActorGroup(PolicyActor, "policy", resources=ONE_THREAD,
                             init_kwargs={"model": "tiny", "optimizer": {"lr": 1e-3}}),
        "reference": ActorGroup(ReferenceActor, "reference", resources=ONE_THREAD, init_kwargs={"model": "tiny"}),
        "generator": ActorGroup(GenerationActor, "generator", num_actors=2, resources=ONE_THREAD,
                                init_kwargs={"model": "tiny"}),
        "critic": ActorGroup(CriticActor, "critic", resources=ONE_THREAD, init_kwargs={"model": "tiny"}),
        "reward": ActorGroup(RewardModelActor, "reward", resources=ONE_THREAD,
                             init_kwargs={"kind": "learned", "model": "tiny"}),
        "gold": ActorGroup(RewardModelActor, "gold", resources=ONE_THREAD,
                           init_kwargs={"kind": "gold", "scorer": "vader", "tokenizer": "tiny"}),
    }
    for group in groups.values():
        group.wait_ready()
    yield groups
    for group in groups.values():
        group.shutdown()


def _batch(tokenizer, padding_side="right"):
    prompts = [tokenizer("The film was")["input_ids"], tokenizer("I watched it and")["input_ids"]]
    responses = [tokenizer(" great fun.")["input_ids"] + [tokenizer.eos_token_id],
                 tokenizer(" it was a long afternoon")["input_ids"]]
    return collate_sequences(prompts, responses, tokenizer.pad_token_id, padding_side=padding_side)


def test_actors_are_named_by_role_and_report_placement(fleet):
    import ray

    assert fleet["generator"].names == ["generator-0", "generator-1"]
    assert ray.get_actor("policy") is not None and ray.get_actor("reference") is not None
    info = fleet["policy"].run_one("info")
    assert info["role"] == "policy" and info["torch_threads"] == 1 and info["device"] == "cpu"


def test_policy_and_reference_logprobs_equal_before_training(fleet, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    pol = fleet["policy"].run_one("logprobs", batch)
    ref = fleet["reference"].run_one("logprobs", batch)
    assert torch.equal(pol["token_logps"], ref["token_logps"])
    assert pol["length"].tolist() == batch["loss_mask"][:, 1:].sum(-1).float().tolist()
    assert (pol["sum"] < 0).all()


def test_logprobs_do_not_depend_on_padding_side_or_micro_batch(fleet, tiny_tokenizer):
    right = fleet["reference"].run_one("logprobs", _batch(tiny_tokenizer, "right"), micro_batch_size=1)
    left = fleet["reference"].run_one("logprobs", _batch(tiny_tokenizer, "left"), micro_batch_size=2)
    assert torch.allclose(right["sum"], left["sum"], atol=1e-4)


def test_generation_is_reproducible_with_a_seed_and_logprobs_match_the_policy(fleet, tiny_tokenizer):
    prompts = [tiny_tokenizer("Once upon a time")["input_ids"], tiny_tokenizer("The movie")["input_ids"],
               tiny_tokenizer("Hello")["input_ids"]]
    sampling = SamplingConfig(n=2, max_new_tokens=12, seed=123)
    first = generate_sharded(fleet["generator"], prompts, sampling)
    again = generate_sharded(fleet["generator"], prompts, sampling)
    other = generate_sharded(fleet["generator"], prompts, SamplingConfig(n=2, max_new_tokens=12, seed=7))
    assert [c.response_ids for c in first] == [c.response_ids for c in again]
    assert [c.response_ids for c in first] != [c.response_ids for c in other]
    assert [c.prompt_index for c in first] == [0, 0, 1, 1, 2, 2]  # gathered in prompt order across shards
    assert all(c.prompt_ids == prompts[c.prompt_index] for c in first)
    # The generator's log-probs of its own samples equal the trainer's recomputation.
    batch = collate_sequences([c.prompt_ids for c in first], [c.response_ids for c in first], tiny_tokenizer.pad_token_id)
    trainer = fleet["policy"].run_one("logprobs", batch)
    generated = torch.tensor([sum(c.logprobs) for c in first])
    assert torch.allclose(trainer["sum"], generated, atol=1e-3)


def test_weight_update_changes_generation_logprobs(fleet, tiny_tokenizer):
    prompts = [tiny_tokenizer("The movie")["input_ids"]]
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    before = generate_sharded(fleet["generator"], prompts, greedy)[0]
    weights = fleet["reference"].run_one("named_weights")
    scaled = {k: v * 1.5 if "lm_head" in k or "embed" in k else v for k, v in weights.items()}
    fleet["generator"].run_all("update_weights", scaled)
    after = generate_sharded(fleet["generator"], prompts, greedy)[0]
    fleet["generator"].run_all("update_weights", weights)
    restored = generate_sharded(fleet["generator"], prompts, greedy)[0]
    assert before.logprobs != after.logprobs
    assert restored.response_ids == before.response_ids
    assert restored.logprobs == pytest.approx(before.logprobs, abs=1e-6)


def test_reward_scores_are_deterministic(fleet, tiny_tokenizer):
    prompt_ids = [tiny_tokenizer("This movie was")["input_ids"]] * 2
    response_ids = [tiny_tokenizer(" wonderful, I loved it")["input_ids"], tiny_tokenizer(" awful and boring")["input_ids"]]
    gold1 = fleet["gold"].run_one("score", prompt_ids, response_ids)["scores"]
    gold2 = fleet["gold"].run_one("score", prompt_ids, response_ids)["scores"]
    assert torch.equal(gold1, gold2) and gold1[0] > 0 > gold1[1]
    learned1 = fleet["reward"].run_one("score", prompt_ids, response_ids)["scores"]
    learned2 = fleet["reward"].run_one("score", prompt_ids, response_ids)["scores"]
    assert torch.equal(learned1, learned2) and learned1.shape == (2,)


def test_critic_values_cover_response_tokens_only(fleet, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    values = fleet["critic"].run_one("values", batch)["values"]
    mask = batch["loss_mask"][:, 1:].bool()
    assert values.shape == mask.shape
    assert (values[~mask] == 0).all() and (values[mask] != 0).all()


def test_sft_step_lowers_response_nll_and_leaves_reference_alone(fleet, tiny_tokenizer):
    batch = _batch(tiny_tokenizer)
    ref_checksum = fleet["reference"].run_one("weights_checksum")
    losses = [fleet["policy"].run_one("train_sft", batch)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0]
    assert fleet["reference"].run_one("weights_checksum") == ref_checksum
    pol = fleet["policy"].run_one("logprobs", batch)
    ref = fleet["reference"].run_one("logprobs", batch)
    assert (pol["sum"] > ref["sum"]).all()


def test_group_call_timeout_names_role_and_method(fleet, tiny_tokenizer):
    many = [tiny_tokenizer("x")["input_ids"]] * 64
    ref = fleet["generator"].actors[0].generate.remote(many, {"max_new_tokens": 64})
    with pytest.raises(ActorCallError, match=r"generator\.generate did not finish within"):
        fleet["generator"].get(ref, "generate", timeout_s=0.01)


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path("./no/such/model")
    with pytest.raises(ModelNotFoundError, match="not a built-in"):
        resolve_model_path("not-a-model")



def test_actor_group_pins_actors_and_books_their_cpu_seconds(ray_cluster):
    import os

    from actors.group import COMPUTE_LEDGER, ActorGroup, ActorResources

    class Spinner:
        """A plain actor (defined here so Ray pickles it by value): burns CPU, reports its affinity."""

        def __init__(self, torch_threads=None):
            pass

        def info(self) -> dict:
            return {}

        def spin(self, seconds: float) -> list[int]:
            import os
            import time

            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
            return sorted(os.sched_getaffinity(0))

    group = ActorGroup(Spinner, "spinner", num_actors=2,
                       resources=ActorResources(torch_threads=1, pin_cores=True, num_cpus=0.1))
    infos = group.wait_ready()
    count = os.cpu_count()
    assert [i["cpu_cores"] for i in infos] == [[0], [1 % count]]
    assert group.run_all("spin", 0.5) == [[0], [1 % count]]
    before = COMPUTE_LEDGER.cpu_s.get("spinner", 0.0)
    group.shutdown()
    assert COMPUTE_LEDGER.cpu_s["spinner"] - before >= 0.9  # two actors spun 0.5 s each


def test_critic_from_a_reward_model_predicts_on_the_normalised_scale(tmp_path, tiny_tokenizer):
    """A critic loaded from a reward-model folder outputs (s − μ)/σ, the scale of PPO's rewards.

    σ = 2 is a power of two, so w/σ and (w·h)/σ are exact; the only rounding differences are in where
    μ and the bias are added ((w·h + b) − μ versus w·h + (b − μ)): a few ulps of the largest magnitude."""
    reward = RewardModelActor(kind="learned", model="tiny")
    with torch.no_grad():
        reward.model.head.bias.fill_(0.25)
    reward.set_normalization(mean=1.5, std=2.0)
    reward.save(str(tmp_path / "rm"))
    critic = CriticActor(str(tmp_path / "rm"))
    batch = collate_sequences([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        raw = reward.model(batch["input_ids"], batch["attention_mask"])
        values = critic.model(batch["input_ids"], batch["attention_mask"])
    expected = (raw - 1.5) / 2.0
    atol = 4 * torch.finfo(torch.float32).eps * float(raw.abs().max() + 1.5) / 2.0
    torch.testing.assert_close(values, expected, rtol=0, atol=atol)
    assert (critic.model.reward_mean, critic.model.reward_std) == (0.0, 1.0)


def _ppo_gradient(micro: int, tiny_tokenizer) -> dict[str, torch.Tensor]:
    """The gradient one PPO minibatch (4 rows of unequal response lengths) leaves on a fresh tiny policy."""
    policy = PolicyActor("tiny", optimizer={"lr": 1e-6, "max_grad_norm": None}, micro_batch_size=micro)
    batch = collate_sequences([[5, 6, 7], [8, 9], [10], [11, 12]], [[13], [14, 15, 16, 17, 18], [19, 20], [21, 22, 23]],
                              tiny_tokenizer.pad_token_id)
    old = policy.logprobs(batch)["token_logps"]
    advantages = torch.linspace(-1.0, 1.0, old.numel()).reshape(old.shape) * batch["loss_mask"][:, 1:]
    policy.train_ppo(batch, old, advantages, {"epochs": 1, "minibatch_size": 4, "micro_batch_size": micro})
    return {name: p.grad.clone() for name, p in policy.model.named_parameters() if p.grad is not None}


def test_ppo_policy_gradient_does_not_depend_on_the_micro_batch_size(tiny_tokenizer):
    """Σ token losses / minibatch tokens: 4 micro-batches of 1 row give the gradient of one of 4 rows.

    Rows weighted equally would differ here by O(1) (response lengths 1, 5, 2, 3). What remains is fp32
    reassociation: the same per-token terms (≈ 11 of them, through the backbone's matmuls of other shapes)
    summed in another order, a few ulps times the number of terms of the largest entry; 1e-5 relative
    (≈ 80 ulps) leaves room for cancellation."""
    whole, split = _ppo_gradient(4, tiny_tokenizer), _ppo_gradient(1, tiny_tokenizer)
    assert whole.keys() == split.keys() and whole
    scale = max(float(g.abs().max()) for g in whole.values())
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-5 * scale, msg=name)
