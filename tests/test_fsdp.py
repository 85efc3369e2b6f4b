"""FSDP2-sharded training groups (gloo on CPU) against a single plain actor, on a real local Ray cluster.

A 2-rank sharded policy and a plain PolicyActor start from the same tiny-Llama weights and get the
same global batches and micro-batch size; the sharded group deals the micro-batches to its ranks.
The math is the same, so only float32 summation order differs: metrics and weights agree within
``ATOL`` (measured differences are ~1e-6 or below). Batches are sized so that one rank has fewer
micro-batches than the other (idle passes) in every kind of call.
"""

from __future__ import annotations

import math

import pytest
import ray
import torch

from actors.math.batch import collate_pairs, collate_sequences
from actors.critic import CriticActor
from actors.generation import GenerationActor
from actors.sampling import SamplingConfig
from actors.group import ActorCallError, ActorGroup, ActorResources
from actors.math.logprobs import position_ids_from_mask, sequence_logprobs
from actors.policy import PolicyActor
from actors.fsdp.group import ShardedActorGroup, training_group

ATOL = 1e-5          # float32 summation-order differences between 1 and 2 ranks (measured <= ~1e-6)
# The gradient norm is a float32 sum of ~3M squares (the tied embedding): a single actor's own norm is
# ~1e-5 relative off its float64 value (measured 8e-6 on the SFT batch), so it is compared relatively.
NORM_RTOL = 5e-5
RTOL = 1e-6          # for unnormalised sums (eval_sft's nll_sum is ~200)
LOGPROB_TOL = 1e-4   # generator vs trainer parity, as in tests/test_vllm_generation.py
STALE_MIN_DIFF = 1e-2
ONE_THREAD = ActorResources(num_cpus=1, torch_threads=1)
FSDP = {"timeout_s": 120}  # a hung collective fails the test instead of waiting 30 min
POLICY = {"model": "tiny", "optimizer": {"lr": 1e-3}, "micro_batch_size": 2, "seed": 0}
LOSS = {"variant": "sigmoid", "beta": 0.1}


@pytest.fixture(scope="module")
def pair(ray_cluster):
    """(plain one-actor group, 2-rank sharded group) from the factory; the sharded one takes half of
    each placement bundle so a critic can be colocated with it."""
    plain = training_group(PolicyActor, "plain-policy", 1, resources=ONE_THREAD, init_kwargs=POLICY,
                           call_timeout_s=300)
    sharded = training_group(PolicyActor, "fsdp-policy", 2, resources=ONE_THREAD, init_kwargs=POLICY, share=0.5,
                             fsdp=FSDP, call_timeout_s=300)
    try:
        plain.wait_ready()
        sharded.wait_ready()
        yield plain, sharded
    finally:
        sharded.shutdown()
        plain.shutdown()


def _ids(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def _pairs(tokenizer, n=3):
    prompts = _ids(tokenizer, ["The film was", "I watched it and", "Once upon a time", "Hello there"][:n])
    chosen = _ids(tokenizer, [" great fun indeed", " left with a smile", " a cat sat", " friend"][:n])
    rejected = _ids(tokenizer, [" bad", " stayed on and on for hours", " nothing happened", " enemy!"][:n])
    return collate_pairs(prompts, chosen, rejected, tokenizer.pad_token_id)


def _sequences(tokenizer, n=5):
    prompts = _ids(tokenizer, ["The film was", "I watched it and", "Once upon a time", "Hello", "My review:"][:n])
    responses = _ids(tokenizer, [" great fun.", " it was a long afternoon", " there was a cat", " world",
                                 " five stars, would watch again"][:n])
    return collate_sequences(prompts, responses, tokenizer.pad_token_id)


def _max_weight_diff(a: ActorGroup, b: ActorGroup) -> float:
    wa, wb = a.run_one("named_weights"), b.run_one("named_weights")
    assert sorted(wa) == sorted(wb)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _assert_metrics_close(a: dict, b: dict, keys=None):
    keys = keys or [k for k in a if "timing_s/" not in k]
    assert set(keys) <= set(b), set(keys) - set(b)
    for k in keys:
        rel = NORM_RTOL if k.endswith("grad_norm") else RTOL
        assert math.isclose(a[k], b[k], abs_tol=ATOL, rel_tol=rel) or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])


def test_group_is_one_role_of_two_ranks_in_one_placement_group(pair):
    plain, sharded = pair
    assert type(plain) is ActorGroup and isinstance(sharded, ShardedActorGroup)
    infos = sharded.wait_ready()
    assert [i["rank"] for i in infos] == [0, 1] and {i["world_size"] for i in infos} == {2}
    assert {i["backend"] for i in infos} == {"gloo"} and {i["sharded_layers"] for i in infos} == {2}
    assert len({i["placement_group"] for i in infos}) == 1 and infos[0]["placement_group"] is not None
    table = ray.util.placement_group_table(sharded.placement.group)
    assert table["strategy"] == "PACK" and len(table["bundles"]) == 2
    assert len(sharded) == 2 and sharded.names == ["fsdp-policy-0", "fsdp-policy-1"]
    assert len(sharded.call_all("info")) == 1  # one combined ObjectRef per call


def test_logprobs_equal_the_plain_actor(pair, tiny_tokenizer):
    plain, sharded = pair
    batch = _sequences(tiny_tokenizer)  # 5 rows, micro 2: rank 0 gets 2 micro-batches, rank 1 one + an idle pass
    expected = plain.run_one("logprobs", batch)
    got = sharded.get(sharded.call_all("logprobs", batch)[0], "logprobs")
    assert list(got) == list(expected)
    for key in ("token_logps", "sum", "length"):
        assert torch.equal(got[key], expected[key]), key  # same micro-batches, same kernels: bit-identical


def test_dpo_steps_match_the_plain_actor(pair, tiny_tokenizer):
    plain, sharded = pair
    batch = _pairs(tiny_tokenizer, 3)  # 3 pairs, 1 pair per micro-batch: rank 1 runs an idle pass
    ref = plain.run_one("logprobs", batch)["sum"]
    rc, rr = ref[:3] - 0.3, ref[3:] + 0.2
    for _ in range(3):
        a = plain.run_one("train_dpo", batch, rc, rr, LOSS, 1)
        b = sharded.run_one("train_dpo", batch, rc, rr, LOSS, 1)
        _assert_metrics_close(a, b)
        assert a["skipped_nonfinite"] == 0 and a["grad_norm"] > 0
    _assert_metrics_close(plain.run_one("eval_dpo", batch, rc, rr, LOSS, 1),
                          sharded.run_one("eval_dpo", batch, rc, rr, LOSS, 1))
    assert _max_weight_diff(plain, sharded) < ATOL


def test_ppo_epochs_match_the_plain_actor(pair, tiny_tokenizer):
    plain, sharded = pair
    batch = _sequences(tiny_tokenizer, 5)
    old = plain.run_one("logprobs", batch)["token_logps"]
    advantages = torch.randn(old.shape, generator=torch.Generator().manual_seed(1)) * batch["loss_mask"][:, 1:]
    # 2 epochs of minibatches [4, 1] (epoch 1 shuffled, seeded), micro-batches of 2 rows: rank 1 idles
    # in the second minibatch of each epoch.
    ppo = {"epochs": 2, "minibatch_size": 4, "micro_batch_size": 2, "seed": 3, "clip_eps": 0.2, "entropy_coef": 0.01}
    a = ray.get(plain.call_all("train_ppo", batch, old, advantages, ppo, None)[0])
    b = ray.get(sharded.call_all("train_ppo", batch, old, advantages, ppo, None)[0])
    assert a["actor/updates"] == b["actor/updates"] == 4
    assert a["actor/ratio_max_dev_first_minibatch"] < 1e-6 and b["actor/ratio_max_dev_first_minibatch"] < 1e-6
    _assert_metrics_close(a, b)
    assert _max_weight_diff(plain, sharded) < ATOL


def test_sft_steps_match_the_plain_actor(pair, tiny_tokenizer):
    plain, sharded = pair
    batch = _sequences(tiny_tokenizer, 5)
    for _ in range(2):
        _assert_metrics_close(plain.run_one("train_sft", batch, 2), sharded.run_one("train_sft", batch, 2))
    _assert_metrics_close(plain.run_one("eval_sft", batch, 2), sharded.run_one("eval_sft", batch, 2))
    assert _max_weight_diff(plain, sharded) < ATOL


def test_a_nonfinite_loss_on_one_rank_skips_the_update_on_all(pair, tiny_tokenizer):
    plain, sharded = pair
    batch = _pairs(tiny_tokenizer, 3)
    before = sharded.run_one("weights_checksum")
    rc = torch.tensor([-10.0, float("nan"), -12.0])  # pair 1 is rank 1's
    rr = torch.tensor([-11.0, -13.0, -12.5])
    skipped = sharded.run_one("train_dpo", batch, rc, rr, LOSS, 1)
    assert skipped["skipped_nonfinite"] == 1 and plain.run_one("train_dpo", batch, rc, rr, LOSS, 1)["skipped_nonfinite"] == 1
    assert sharded.run_one("weights_checksum") == before
    # Both ranks are still in step: the next finite update works and still matches.
    rc = torch.tensor([-10.0, -12.0, -12.0])
    _assert_metrics_close(plain.run_one("train_dpo", batch, rc, rr, LOSS, 1),
                          sharded.run_one("train_dpo", batch, rc, rr, LOSS, 1))


def test_checkpoints_load_into_other_world_sizes(pair, tiny_tokenizer, tmp_path):
    plain, sharded = pair
    batch = _pairs(tiny_tokenizer, 3)
    rc, rr = torch.tensor([-10.0, -12.0, -12.0]), torch.tensor([-11.0, -13.0, -12.5])
    sharded.run_one("save_state", str(tmp_path / "two"))
    one = ShardedActorGroup(PolicyActor, "fsdp-policy-one", num_workers=1, resources=ONE_THREAD, init_kwargs=POLICY,
                            fsdp=FSDP, call_timeout_s=300)
    try:
        one.wait_ready()
        expected_step = sharded.run_one("train_dpo", batch, rc, rr, LOSS, 1)  # the step after the checkpoint
        sharded.run_one("load_state", str(tmp_path / "two"))                  # back to the checkpoint
        assert one.run_one("load_state", str(tmp_path / "two")) == plain.run_one("load_state", str(tmp_path / "two"))
        assert _max_weight_diff(sharded, one) == 0.0 and _max_weight_diff(sharded, plain) == 0.0
        # Weights, AdamW moments, schedule and step counter all came back: the next step is the same one.
        for group in (sharded, one, plain):
            _assert_metrics_close(expected_step, group.run_one("train_dpo", batch, rc, rr, LOSS, 1))
        assert _max_weight_diff(sharded, one) < ATOL and _max_weight_diff(sharded, plain) < ATOL
        # A plain actor's trainer_state.pt loads into a sharded group too.
        plain.run_one("save_state", str(tmp_path / "plain"))
        one.run_one("load_state", str(tmp_path / "plain"))
        assert _max_weight_diff(plain, one) == 0.0
        _assert_metrics_close(plain.run_one("train_dpo", batch, rc, rr, LOSS, 1),
                              one.run_one("train_dpo", batch, rc, rr, LOSS, 1))
    finally:
        placement = one.placement.group
        one.shutdown()
    assert ray.util.placement_group_table(placement)["state"] == "REMOVED"
    assert not one.actors


def test_save_exports_an_hf_folder_with_the_trained_weights(pair, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    _, sharded = pair
    path = sharded.run_one("save", str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.architectures == ["LlamaForCausalLM"]
    batch = _sequences(tiny_tokenizer)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids_from_mask(batch["attention_mask"])).logits
    loaded = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"]).token_logps
    trained = sharded.run_one("logprobs", batch)["token_logps"]
    assert float((loaded - trained).abs().max()) < ATOL


def test_weight_sync_from_the_sharded_group_gives_generator_logprob_parity(pair, tiny_tokenizer):
    _, sharded = pair
    generator = ActorGroup(GenerationActor, "fsdp-generator", resources=ONE_THREAD, init_kwargs={"model": "tiny"})
    try:
        generator.wait_ready()
        prompts = _ids(tiny_tokenizer, ["The film was", "Once upon a time", "I watched it and"])

        def parity(seed):
            samples = generator.run_one("generate", prompts, SamplingConfig(n=2, max_new_tokens=8, seed=seed))
            completions = samples["completions"]
            batch = collate_sequences([c.prompt_ids for c in completions], [c.response_ids for c in completions],
                                      tiny_tokenizer.pad_token_id)
            trainer = sharded.run_one("logprobs", batch)["token_logps"]
            diffs = []
            for row, c in enumerate(completions):
                first = len(c.prompt_ids) - 1
                ours = trainer[row, first:first + len(c.response_ids)]
                diffs.append((ours - torch.tensor(c.logprobs)).abs())
            diffs = torch.cat(diffs)
            return float(diffs.max()), float(diffs.mean())

        sharded.run_one("train_sft", _sequences(tiny_tokenizer), 2)  # a training step on the sharded policy
        stale_max, stale_mean = parity(5)  # the generator still has the initial weights
        assert stale_mean > STALE_MIN_DIFF
        weights = sharded.call_all("named_weights")[0]  # rank 0's ObjectRef, straight to the generator
        synced = generator.run_one("update_weights", weights, 1)
        assert synced["weights_version"] == 1
        gather = sharded.run_one("weight_sync_stats")
        assert gather["seconds"] > 0 and gather["tensors"] > 0 and gather["bytes"] > 0
        synced_max, _ = parity(6)
        print(f"[weight sync] gather {gather}; parity max |diff| {synced_max:.1e} (stale mean {stale_mean:.1e})")
        assert synced_max < LOGPROB_TOL
    finally:
        generator.shutdown()


def test_sharded_critic_colocated_with_the_policy_matches_a_plain_critic(pair, tiny_tokenizer):
    _, policy = pair
    kwargs = {"model": "tiny", "micro_batch_size": 2, "optimizer": {"lr": 1e-3}}
    plain = training_group(CriticActor, "plain-critic", 1, resources=ONE_THREAD, init_kwargs=kwargs)
    sharded = training_group(CriticActor, "fsdp-critic", 2, resources=ONE_THREAD, init_kwargs=kwargs,
                             colocate_with=policy, share=0.5, fsdp=FSDP, call_timeout_s=300)
    try:
        plain.wait_ready()
        infos = sharded.wait_ready()
        assert {i["placement_group"] for i in infos} == {policy.wait_ready()[0]["placement_group"]}
        with pytest.raises(ValueError, match="left"):  # both roles took half of each bundle already
            ShardedActorGroup(CriticActor, "third", num_workers=2, colocate_with=policy, share=0.5)
        batch = _sequences(tiny_tokenizer, 5)
        values = ray.get(plain.call_all("values", batch)[0])["values"]
        assert torch.equal(ray.get(sharded.call_all("values", batch)[0])["values"], values)
        returns = values + torch.randn(values.shape, generator=torch.Generator().manual_seed(2)) * batch["loss_mask"][:, 1:]
        ppo = {"epochs": 2, "minibatch_size": 4, "micro_batch_size": 2, "seed": 3}
        a = ray.get(plain.call_all("train_value", batch, values, returns, ppo)[0])
        b = ray.get(sharded.call_all("train_value", batch, values, returns, ppo)[0])
        _assert_metrics_close(a, b)
        after = ray.get(sharded.call_all("values", batch)[0])["values"]
        assert float((after - ray.get(plain.call_all("values", batch)[0])["values"]).abs().max()) < ATOL
    finally:
        sharded.shutdown()
        plain.shutdown()
    assert policy.placement.group is not None  # the policy still holds the shared placement group


def test_sharded_reward_model_matches_a_plain_one(ray_cluster, tiny_tokenizer, tmp_path):
    """Bradley-Terry steps, held-out accuracy/margin and per-row scores of a 2-rank reward model equal a
    single actor's; its saved folder loads as a ScalarHeadModel that scores the same."""
    from actors.reward import RewardModelActor
    from actors.value_model import ScalarHeadModel, last_token_index

    kwargs = {"kind": "learned", "model": "tiny", "micro_batch_size": 2, "optimizer": {"lr": 1e-3},
              "normalize": False}
    plain = training_group(RewardModelActor, "plain-rm", 1, resources=ONE_THREAD, init_kwargs=kwargs)
    sharded = training_group(RewardModelActor, "fsdp-rm", 2, resources=ONE_THREAD, init_kwargs=kwargs, fsdp=FSDP,
                             call_timeout_s=300)
    try:
        plain.wait_ready()
        assert [i["rank"] for i in sharded.wait_ready()] == [0, 1]
        batch = _pairs(tiny_tokenizer, 3)  # 2 pair micro-batches of 2 and 1: rank 1 has one, rank 0 one
        for _ in range(2):
            _assert_metrics_close(plain.run_one("train_rm", batch), sharded.run_one("train_rm", batch))
        eval_batch = _pairs(tiny_tokenizer, 4)
        _assert_metrics_close(plain.run_one("eval_rm", eval_batch), sharded.run_one("eval_rm", eval_batch))
        prompts = [tiny_tokenizer("The film was")["input_ids"]] * 5
        responses = [tiny_tokenizer(t)["input_ids"] for t in [" good", " bad", " fine, I suppose", " meh", " wow"]]
        want = plain.run_one("score", prompts, responses)["scores"]
        got = sharded.run_one("score", prompts, responses)["scores"]
        assert got.shape == (5,) and float((got - want).abs().max()) < ATOL
        folder = sharded.run_one("save", str(tmp_path / "rm"))
        reloaded = ScalarHeadModel.from_pretrained(folder).eval()
        seqs = collate_sequences(prompts, responses, tiny_tokenizer.pad_token_id)
        with torch.no_grad():
            values = reloaded(seqs["input_ids"], seqs["attention_mask"])
        last = values.gather(1, last_token_index(seqs["attention_mask"]).unsqueeze(1)).squeeze(1)
        assert float((last - got).abs().max()) < ATOL
        assert (tmp_path / "rm" / "tokenizer.json").exists()
    finally:
        sharded.shutdown()
        plain.shutdown()


def test_a_dead_rank_fails_the_call_at_once_and_shutdown_cleans_up(ray_cluster, tiny_tokenizer):
    import time

    group = ShardedActorGroup(PolicyActor, "doomed-policy", num_workers=2, resources=ONE_THREAD, init_kwargs=POLICY,
                              fsdp=FSDP, call_timeout_s=300)
    placement = group.placement.group
    try:
        group.wait_ready()
        ray.kill(group.actors[1], no_restart=True)
        start = time.perf_counter()
        with pytest.raises(ActorCallError, match="doomed-policy"):
            group.run_one("logprobs", _sequences(tiny_tokenizer))
        # Rank 0 is left waiting in a collective; the combined result does not wait for it (nor for
        # the 120 s process-group timeout).
        assert time.perf_counter() - start < 60
    finally:
        group.shutdown()
    assert ray.util.placement_group_table(placement)["state"] == "REMOVED"
