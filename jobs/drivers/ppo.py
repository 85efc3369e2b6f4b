"""PPO (RLHF) over the actor fleet: a single controller moving token ids, log-probs and rewards.

    python -m jobs.ppo --preset ppo_smollm2_vader [key.sub=value ...]

One step: rollout on the generation group -> reference log-probs, rollout log-probs, reward scores
and critic values -> per-token rewards with the KL penalty -> GAE -> advantage whitening -> epochs of
clipped policy and value updates -> push the new policy weights to the generators. The passes and the two
updates run concurrently, one thread per actor, or with ``torch_threads`` set take the cores in turns
(``score_rollout``, ``update_policy_and_critic``). The config (every key, default and check) lives in
:mod:`jobs.drivers.ppo_config`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from actors.critic import CriticActor
from actors.generation import GenerationActor, generate_sharded
from actors.group import ActorGroup, ActorResources
from actors.math.batch import collate_sequences
from actors.math.ppo_math import (AdaptiveKLController, FixedKLController, gae_advantages, kl_estimate,
                                  kl_penalized_rewards, masked_mean, masked_whiten)
from actors.policy import PolicyActor
from actors.ppo_update import PPOUpdateConfig
from actors.reference import ReferenceActor
from actors.reward import RewardModelActor
from actors.runtime import set_rng_state
from actors.sampling import Completion
from jobs.drivers.ppo_config import PPOConfig
from jobs.experiment.stats import bootstrap_ci
from jobs.run.snapshots import saved_snapshots
from jobs.run.checkpoint import CheckpointWriter, check_resume, load_driver_state
from jobs.run.cluster import build_training_group, role_resources
from jobs.run.config import run_cli
from jobs.run.faults import FaultInjector, NonFiniteGuard
from jobs.run.metrics import MetricsLogger
from jobs.run.prompt_run import run_prompt_job
from jobs.run.step_loop import SaveActors, StepLoop
from jobs.run.sampler import ShuffledBatches

__all__ = ["PPOConfig", "train", "main", "step_ppo_args", "build_fleet", "evaluate", "frozen_threads", "score_rollout",
           "update_policy_and_critic"]


@dataclass
class Fleet:
    policy: ActorGroup
    reference: ActorGroup | None  # None: a LoRA policy is its own reference (adapters disabled)
    reward: ActorGroup
    critic: ActorGroup | None  # None: a critic-free fleet (build_fleet(..., critic=False))
    generators: ActorGroup
    judge: ActorGroup | None
    adapter_sync: bool = False  # LoRA policy and LoRA-enabled vLLM generators: push only the adapters

    def reference_logprobs(self, batch, temperature: float = 1.0):
        """An ObjectRef to the reference's log-probs of ``batch`` at ``temperature``: the ReferenceActor's, or
        with LoRA the policy's own base model (``PolicyActor.reference_logprobs``)."""
        if self.reference is None:
            return self.policy.submit("reference_logprobs", batch, temperature=temperature)
        return self.reference.submit("logprobs", batch, temperature=temperature)

    def push_weights(self, version: int) -> None:
        """Policy -> object store -> generators, without a stop in the driver: the LoRA adapters alone
        where every generator serves adapters, else the full (with LoRA: merged) weights."""
        weights = self.policy.submit("adapter_weights" if self.adapter_sync else "named_weights")
        self.generators.run_all("update_weights", weights, version)

    def groups(self) -> dict[str, ActorGroup]:
        found = {"policy": self.policy, "reference": self.reference, "reward": self.reward, "critic": self.critic,
                 "generator": self.generators, "judge": self.judge}
        return {role: group for role, group in found.items() if group is not None}

    def shutdown(self) -> None:
        for group in self.groups().values():
            group.shutdown()


def frozen_threads(torch_threads: int | None) -> int | None:
    """Threads for the reference and the reward model, which score each rollout side by side before the
    policy's own pass (``score_rollout``): half the budget each, so the pair fills the cores without
    over-subscribing them. None (Ray's one thread per actor): all the passes run at once."""
    return max(1, torch_threads // 2) if torch_threads else None


def build_fleet(config: PPOConfig, *, critic: bool = True, micro_batch_size: int | None = None) -> Fleet:
    """PPO's roles. ``critic=False`` builds the same fleet without a critic for a config that has no critic
    keys (online DPO); ``micro_batch_size`` then stands in for ``config.ppo.micro_batch_size``."""
    resources = ActorResources(torch_threads=config.torch_threads)

    # Frozen roles hold nothing a checkpoint must restore: Ray restarts them and retries their calls. With a
    # critic they score side by side (score_rollout): half the threads each; without (online DPO) one at a time.
    frozen = dataclasses.replace(resources, max_restarts=config.faults.frozen_role_restarts,
                                 max_task_retries=config.faults.frozen_role_restarts,
                                 torch_threads=frozen_threads(config.torch_threads) if critic else config.torch_threads)

    def place(role: str) -> ActorResources:
        return role_resources(frozen if role in ("reference", "reward") else resources, config.placement, role)

    common = {"seed": config.seed}
    reward_kwargs = ({"kind": "gold", "scorer": config.reward.scorer, "tokenizer": config.model}
                     if config.reward.kind == "gold" else {"kind": "learned", "model": config.reward.model})
    micro = micro_batch_size if micro_batch_size is not None else config.ppo.micro_batch_size
    timeout = config.faults.call_timeout_s
    made: dict[str, ActorGroup] = {}
    try:
        made["policy"] = build_training_group(
            PolicyActor, "policy", config.policy, resources=place("policy"), call_timeout_s=timeout, init_kwargs={
                "model": config.model, "optimizer": dataclasses.asdict(config.optimizer), "micro_batch_size": micro,
                **common})
        if not config.policy.lora:  # a LoRA policy is its own reference: no second copy of the weights
            made["reference"] = ActorGroup(ReferenceActor, "reference", resources=place("reference"), init_kwargs={
                "model": config.reference_model or config.model, "micro_batch_size": micro, **common})
        made["reward"] = ActorGroup(RewardModelActor, "reward", resources=place("reward"),
                                    init_kwargs={**reward_kwargs, **common})
        if critic:
            critic_model = config.critic_model or (config.reward.model if config.reward.kind == "learned"
                                                   else config.model)
            made["critic"] = build_training_group(
                CriticActor, "critic", config.critic, resources=place("critic"), call_timeout_s=timeout,
                colocate_with=made["policy"] if config.critic.colocate_with == "policy" else None, init_kwargs={
                    "model": critic_model, "optimizer": dataclasses.asdict(config.critic_optimizer),
                    "micro_batch_size": micro, **common})
        # generation runs alone in a step: generation_options.threads gives the generators more threads than
        # the roles that score and train concurrently (the vLLM engine's threads and the actor's torch threads)
        gen_threads = config.generation_options.get("threads") or config.torch_threads
        made["generator"] = ActorGroup(GenerationActor, "generator", num_actors=config.num_generators,
                                       indexed_names=True, init_kwargs={
                                           "model": config.model, "backend": config.generation_backend,
                                           "backend_options": config.generation_options,
                                           "lora": dict(config.policy.lora) or None, **common},
                                       resources=dataclasses.replace(place("generator"), torch_threads=gen_threads))
        if config.eval_scorer:
            made["judge"] = ActorGroup(RewardModelActor, "judge", resources=role_resources(
                dataclasses.replace(frozen, num_cpus=0.5, torch_threads=1), config.placement, "judge"),
                init_kwargs={"kind": "gold", "scorer": config.eval_scorer, "tokenizer": config.model})
        for group in made.values():
            group.call_timeout_s = timeout
            group.wait_ready()
    except BaseException:
        for group in made.values():  # no orphaned actors (or placement groups) when one role fails to start
            group.shutdown()
        raise
    adapter_sync = bool(config.policy.lora) and all(made["generator"].run_all("accepts_adapters"))
    return Fleet(policy=made["policy"], reference=made.get("reference"), reward=made["reward"], critic=made.get("critic"),
                 generators=made["generator"], judge=made.get("judge"), adapter_sync=adapter_sync)


@dataclass
class Rollout:
    completions: list[Completion]
    batch: dict
    mask: torch.Tensor          # [B, T-1] response tokens in the shifted layout
    generator_logprobs: torch.Tensor


def make_rollout(completions: list[Completion], pad_id: int) -> Rollout:
    batch = collate_sequences([c.prompt_ids for c in completions], [c.response_ids for c in completions], pad_id)
    mask = batch["loss_mask"][:, 1:].float()
    gen = torch.zeros_like(mask)
    for i, c in enumerate(completions):
        positions = mask[i].nonzero().squeeze(-1)
        gen[i, positions] = torch.tensor(c.logprobs, dtype=torch.float32)
    return Rollout(completions, batch, mask, gen)


def evaluate(fleet: Fleet, prompts: list[list[int]], config: PPOConfig, pad_id: int) -> dict:
    """Gold reward and sequence KL to the reference of samples from the current policy (held-out prompts)."""
    if not prompts:
        return {}
    sampling = dataclasses.replace(config.rollout, n=config.eval_samples_per_prompt, seed=config.seed + 10_000)
    completions = generate_sharded(fleet.generators, prompts, sampling)
    rollout = make_rollout(completions, pad_id)
    # both at the temperature the samples were drawn at, so the sequence KL is one between those distributions
    pol_ref = fleet.policy.submit("logprobs", rollout.batch, temperature=sampling.temperature)
    ref_ref = fleet.reference_logprobs(rollout.batch, sampling.temperature)
    prompt_ids, response_ids = [c.prompt_ids for c in completions], [c.response_ids for c in completions]
    judge = fleet.judge or fleet.reward
    gold = judge.run_one("score", prompt_ids, response_ids)["scores"]
    policy_lp, reference_lp = ray.get([pol_ref, ref_ref])
    seq_kl = (policy_lp["sum"] - reference_lp["sum"])  # E_pi[log pi - log ref] estimated from samples
    low, high = bootstrap_ci(gold.numpy(), seed=config.seed)
    kl_low, kl_high = bootstrap_ci(seq_kl.numpy(), seed=config.seed)
    return {"eval/gold_reward_mean": float(gold.mean()), "eval/gold_reward_std": float(gold.std()),
            "eval/gold_reward_ci_low": low, "eval/gold_reward_ci_high": high,
            "eval/kl": float(seq_kl.mean()), "eval/kl_ci_low": kl_low, "eval/kl_ci_high": kl_high,
            "eval/response_length": float(rollout.mask.sum(-1).mean())}


def train(config: PPOConfig) -> dict:
    """Run PPO end to end (resuming and recovering from dead actors as configured); returns the summary
    written to ``summary.json``."""
    return run_prompt_job(config, _train_attempt)


def ppo_actor_saver(fleet: Fleet) -> SaveActors:
    """A PPO checkpoint's actors: the policy's and the critic's training states, saved in parallel."""

    def save_actors(folder: Path) -> list[str]:
        refs = [fleet.policy.submit("save_state", str(folder / "policy")),
                fleet.critic.submit("save_state", str(folder / "critic"))]
        fleet.policy.get(refs, "save_state")
        return ["policy", "critic"]

    return save_actors


def restore_checkpoint(fleet: Fleet, folder: Path, step: int) -> None:
    """Policy and critic back to the checkpoint, and the generators given the restored policy's weights."""
    refs = [fleet.policy.submit("load_state", str(folder / "policy")),
            fleet.critic.submit("load_state", str(folder / "critic"))]
    fleet.policy.get(refs, "load_state")
    fleet.push_weights(step)


def step_ppo_args(config: PPOConfig, kl_ctl) -> PPOUpdateConfig:
    """This step's update hyper-parameters (the policy's and the critic's): with ``kl.in_loss`` the in-loss KL
    coefficient is the controller's current value (adaptive or fixed), read afresh each step, not ``kl.coef``."""
    return config.update_config(kl_ctl.value)


def score_rollout(config: PPOConfig, fleet: Fleet, rollout: Rollout, prompt_ids, response_ids,
                  temperature: float) -> dict:
    """The rollout's passes: policy and reference log-probs at ``temperature``, reward scores, and critic values
    where the fleet has a critic (the critic-free drivers share this).

    Without a thread budget (``torch_threads`` unset: Ray's one thread per actor) all at once. With one, the
    cores are taken in turns so that no pass over-subscribes them: the frozen pair side by side on half the
    threads each (``frozen_threads``), then the policy and then the critic alone on all of them."""
    trained = {"policy": lambda: fleet.policy.submit("logprobs", rollout.batch, temperature=temperature)}
    if fleet.critic is not None:
        trained["critic"] = lambda: fleet.critic.submit("values", rollout.batch)
    refs = {"reference": fleet.reference_logprobs(rollout.batch, temperature),
            "reward": fleet.reward.submit("score", prompt_ids, response_ids)}
    if not config.torch_threads:
        refs.update({name: call() for name, call in trained.items()})
        return dict(zip(refs, fleet.policy.get(list(refs.values()), "score rollout")))
    results = dict(zip(refs, fleet.policy.get(list(refs.values()), "score rollout")))
    for name, call in trained.items():
        (results[name],) = fleet.policy.get([call()], "score rollout")
    return results


def update_policy_and_critic(config: PPOConfig, fleet: Fleet, batch, old_logprobs, advantages, values, returns,
                             update: PPOUpdateConfig, ref_logprobs) -> tuple[dict, dict]:
    """One step's PPO update of the policy and the critic: (policy metrics, critic metrics).

    Concurrently without a thread budget (one thread each). With one, the critic first and then the policy,
    each on all the threads: two trainers at full width at once would over-subscribe the cores, and at one
    thread each the policy (the larger update) left a core idle once the critic was done. The two updates
    share no state, so the order changes no number."""
    policy = lambda: fleet.policy.submit("train_ppo", batch, old_logprobs, advantages, update, ref_logprobs)
    critic = lambda: fleet.critic.submit("train_value", batch, values, returns, update)
    if not config.torch_threads:
        return tuple(fleet.policy.get([policy(), critic()], "train"))
    (critic_metrics,) = fleet.policy.get([critic()], "train")
    (policy_metrics,) = fleet.policy.get([policy()], "train")
    return policy_metrics, critic_metrics


def _train_attempt(config: PPOConfig, pad_id: int, train_ids, eval_ids, resume_from: Path | None, recoveries: int,
                   faults: FaultInjector) -> dict:
    out = Path(config.output_dir) / config.run_name
    fleet = build_fleet(config)
    try:
        hp = config.ppo
        kl_ctl = (AdaptiveKLController(config.kl.coef, config.kl.target, config.kl.horizon) if config.kl.adaptive
                  else FixedKLController(config.kl.coef))
        prompt_batches = ShuffledBatches(len(train_ids), config.prompts_per_step, config.seed)
        guard = NonFiniteGuard(config.faults.max_nonfinite_in_row)
        writer = CheckpointWriter(out, config.checkpoint.keep, config)
        state = {"step": 0, "tokens_generated": 0, "tokens_trained": 0, "first_eval": {}, "last_eval": {}}
        rows, wall_before = None, 0.0
        if resume_from is not None:
            check_resume(resume_from, config)
            driver = load_driver_state(resume_from)
            state, rows, wall_before = driver["state"], driver["metrics"], driver["wall_s"]
            restore_checkpoint(fleet, resume_from, state["step"])
            prompt_batches.load_state_dict(driver["batches"])
            kl_ctl.load_state_dict(driver["kl"])
            guard.load_state_dict(driver["guard"])
            set_rng_state(driver["rng"])
            print(f"[resume] from {resume_from} at step {state['step']}")
        logger = MetricsLogger(out, resume_rows=rows)
        loop = StepLoop(config, out, fleet.policy, prompt_batches, guard, writer, logger, state, "step", config.steps,
                        wall_before)
        run_eval = (lambda: evaluate(fleet, eval_ids, config, pad_id)) if eval_ids else None
        if resume_from is None:
            state["first_eval"] = state["last_eval"] = evaluate(fleet, eval_ids, config, pad_id)
            logger.log(0, state["first_eval"])
            print(f"[eval] step 0: {json.dumps({k: round(v, 4) for k, v in state['first_eval'].items()})}")
        bar = tqdm(range(state["step"] + 1, config.steps + 1), desc="ppo", unit="step", dynamic_ncols=True,
                   initial=state["step"], total=config.steps)
        for step in bar:
            t_step = time.perf_counter()
            index = prompt_batches.next()
            timing: dict[str, float] = {}
            faults.maybe_kill(step, fleet.groups())

            t0 = time.perf_counter()
            sampling = dataclasses.replace(config.rollout, seed=config.seed * 100_003 + step)
            rollout = make_rollout(generate_sharded(fleet.generators, [train_ids[i] for i in index], sampling), pad_id)
            timing["generate"] = time.perf_counter() - t0
            mask = rollout.mask
            prompt_ids = [c.prompt_ids for c in rollout.completions]
            response_ids = [c.response_ids for c in rollout.completions]

            t0 = time.perf_counter()
            # log-probs at the rollout temperature: the distribution the generators sampled from
            results = score_rollout(config, fleet, rollout, prompt_ids, response_ids, sampling.temperature)
            timing["score"] = time.perf_counter() - t0  # wall time of the four passes
            old_logprobs = results["policy"]["token_logps"]
            ref_logprobs = results["reference"]["token_logps"]
            values = results["critic"]["values"]
            scores = results["reward"]["scores"].clone()
            timing.update({"ref": float(results["reference"]["seconds"]), "reward": float(results["reward"]["seconds"]),
                           "values": float(results["critic"]["seconds"]), "old_logprobs": float(results["policy"]["seconds"])})

            t0 = time.perf_counter()
            raw_scores = scores.clone()
            no_eos = torch.tensor([c.finish_reason != "stop" for c in rollout.completions])
            if config.reward.missing_eos_penalty is not None:
                scores = scores - config.reward.missing_eos_penalty * no_eos.float()
            kl_coef_now = 0.0 if config.kl.in_loss else kl_ctl.value
            token_rewards, token_kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef_now,
                                                           config.kl.estimator, config.reward.clip)
            if hp.whiten_rewards:
                token_rewards = masked_whiten(token_rewards, mask, shift_mean=False)
            advantages, returns = gae_advantages(token_rewards, values, mask, hp.gamma, hp.lam)
            if hp.whiten_advantages:
                advantages = masked_whiten(advantages, mask) * mask
            if faults.poison(step):
                advantages = advantages * float("nan")
            seq_kl = (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(-1)
            timing["advantages"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            update = step_ppo_args(config, kl_ctl)
            actor_metrics, critic_metrics = update_policy_and_critic(
                config, fleet, rollout.batch, old_logprobs, advantages, values, returns, update,
                ref_logprobs if config.kl.in_loss else None)
            timing["update"] = time.perf_counter() - t0  # wall time of both updates
            timing["update_actor"] = actor_metrics["timing_s/total"]
            timing["update_critic"] = critic_metrics["critic/timing_s/total"]

            t0 = time.perf_counter()
            fleet.push_weights(step)
            timing["sync_weights"] = time.perf_counter() - t0
            kl_ctl.update(float(seq_kl.mean()), config.prompts_per_step * config.rollout.n)
            timing["step"] = time.perf_counter() - t_step

            generated = int(mask.sum())
            state["tokens_generated"] += generated
            state["tokens_trained"] += int(actor_metrics["tokens"])
            metrics = {
                **{k: v for k, v in actor_metrics.items() if k.startswith("actor/")},
                **{k: v for k, v in critic_metrics.items() if k in ("critic/vf_loss", "critic/vf_clipfrac", "critic/vf_explained_var")},
                "actor/grad_norm": actor_metrics["grad_norm"], "actor/lr": actor_metrics["lr"],
                "reward/score_mean": float(raw_scores.mean()), "reward/score_std": float(raw_scores.std()),
                "reward/penalized_score_mean": float(scores.mean()),
                "reward/kl_penalty": float(-(kl_coef_now * token_kl * mask).sum(-1).mean()),
                "reward/no_eos_fraction": float(no_eos.float().mean()),
                "objective/kl": float(seq_kl.mean()), "objective/kl_coef": kl_ctl.value,
                "objective/entropy": float(-(old_logprobs * mask).sum(-1).mean()),
                "rollout/logprob_diff": float(masked_mean((rollout.generator_logprobs - old_logprobs).abs(), mask)),
                "response_length/mean": float(mask.sum(-1).mean()),
                "perf/tokens_per_s": generated / timing["step"],
                **{f"timing_s/{k}": v for k, v in timing.items()},
            }
            metrics["skipped_nonfinite"] = max(actor_metrics["skipped_nonfinite"], critic_metrics["critic/skipped_nonfinite"])
            loop.end_step(step, index, metrics, run_eval, ppo_actor_saver(fleet), kl=kl_ctl.state_dict())
            bar.set_postfix(score=f"{metrics['reward/score_mean']:+.3f}", kl=f"{metrics['objective/kl']:.2f}",
                            len=f"{metrics['response_length/mean']:.0f}", s=f"{timing['step']:.1f}")
        checkpoint = loop.finish()
        weight_sync = "lora_adapters" if fleet.adapter_sync else ("merged_lora" if config.policy.lora else "full")
    finally:
        fleet.shutdown()
    first_eval, last_eval = state["first_eval"], state["last_eval"]
    summary = {"steps": config.steps, "wall_s": loop.wall_s(),
               "checkpoint": str(checkpoint), "snapshots": saved_snapshots(out, config.snapshot_steps),
               "tokens_generated": state["tokens_generated"],
               "tokens_trained": state["tokens_trained"], "start": first_eval, "end": last_eval,
               "kl_coef_final": kl_ctl.value, "resumed_from": str(resume_from) if resume_from else None,
               "recoveries": recoveries, "faults_injected": faults.killed, "nonfinite_skipped_steps": guard.skipped_steps,
               "weight_sync": weight_sync, "roles": sorted(fleet.groups())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"[eval] start {json.dumps(first_eval)}\n[eval] end   {json.dumps(last_eval)}")
    print(f"[done] {config.steps} steps; checkpoint {checkpoint}")
    return summary


def main(argv=None) -> int:
    return run_cli(PPOConfig, train, "python -m jobs.ppo", __doc__, argv, "key.sub=value overrides, e.g. kl.coef=0.1")


if __name__ == "__main__":
    raise SystemExit(main())
