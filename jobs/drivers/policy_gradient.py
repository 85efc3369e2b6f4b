"""Critic-free policy-gradient RL (RLOO, GRPO, Dr. GRPO, REINFORCE++) over the PPO actor fleet minus the critic.

    python -m jobs.policy_gradient --preset policy_gradient_tiny advantage=grpo samples_per_prompt=4

One step: k samples per prompt on the generation group -> reference log-probs, rollout log-probs and reward
scores (concurrently) -> the configured advantage estimator (actors.math.advantages) -> the policy actor's
clipped update (``train_ppo``), with the KL to the reference either in the loss (k3, GRPO / Dr. GRPO, as in
DeepSeekMath) or in the reward (RLOO: sequence KL subtracted from the score; REINFORCE++: per token)
-> the new weights pushed to the generators. Checkpoints, resume, NaN guards and metrics are PPO's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from actors.generation import GenerationActor, generate_sharded
from actors.group import ActorGroup, ActorResources
from actors.math.advantages import ESTIMATORS, reinforce_pp_advantages, sequence_advantages, to_tokens
from actors.math.ppo_math import kl_estimate, masked_mean
from actors.optim import OptimizerConfig
from actors.policy import PolicyActor
from actors.ppo_update import PPOUpdateConfig
from actors.reference import ReferenceActor
from actors.reward import RewardModelActor
from actors.sampling import SamplingConfig
from jobs.data.source import DataConfig
from jobs.drivers.ppo import Fleet, evaluate, frozen_threads, make_rollout
from jobs.drivers.ppo import score_rollout as ppo_score_rollout
from jobs.drivers.ppo_config import RewardConfig, check_on_policy_run, check_on_policy_sampling, check_update
from jobs.run.batching import TokenizeConfig
from jobs.run.snapshots import saved_snapshots
from jobs.run.checkpoint import CheckpointConfig
from jobs.run.cluster import role_resources
from jobs.run.config import ConfigError, run_cli
from jobs.run.faults import FaultConfig, FaultInjector
from jobs.run.prompt_run import run_prompt_job
from jobs.run.step_loop import open_policy_loop, save_policy_only

# Where each estimator puts the KL to the reference (its paper's choice).
KL_IN_LOSS = {"grpo": True, "dr_grpo": True, "rloo": False, "reinforce_pp": False}


U = PPOUpdateConfig  # the update knobs' one default each lives there (meanings too)


@dataclass
class UpdateConfig:
    """The policy update's knobs (actors.ppo_update.PPOUpdateConfig) and REINFORCE++'s γ. The first three
    are this method's own defaults, not PPO's: one optimizer step on the whole rollout (GRPO's μ = 1)."""
    epochs: int = 1                    # GRPO's μ; 1 = on-policy (the ratio is then 1 on the first minibatch)
    minibatch_size: int = 16
    micro_batch_size: int = 16
    clip_eps: float = U.clip_eps
    clip_eps_high: float | None = U.clip_eps_high  # asymmetric upper clip (DAPO's clip-higher); null: clip_eps
    entropy_coef: float = U.entropy_coef
    kl_estimator: str = U.kl_estimator  # the in-loss KL's estimator (grpo, dr_grpo); k3 as DeepSeekMath
    gamma: float = 1.0                 # REINFORCE++ return discount


@dataclass
class PolicyGradientConfig:
    run_name: str = "policy_gradient"
    output_dir: str = "runs"
    seed: int = 0
    model: str = "smollm2"
    reference_model: str | None = None
    advantage: str = "grpo"            # rloo | grpo | dr_grpo | reinforce_pp
    samples_per_prompt: int = 4        # k; the group estimators need k >= 2
    kl_coef: float = 0.05              # β: in the loss (update.kl_estimator) for grpo/dr_grpo, in the reward (k1) otherwise
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=lambda: TokenizeConfig(max_prompt_length=64, max_length=128))
    rollout: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48))
    prompts_per_step: int = 4
    steps: int = 20
    reward: RewardConfig = field(default_factory=RewardConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-6, eps=1e-5))
    num_generators: int = 1
    generation_backend: str = "auto"
    generation_options: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 10
    eval_prompts: int = 32
    eval_samples_per_prompt: int = 1
    eval_scorer: str | None = "vader"
    torch_threads: int | None = None
    address: str | None = None
    placement: dict[str, dict[str, float]] = field(default_factory=dict)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    snapshot_steps: list[int] = field(default_factory=list)  # save the policy (HF folder) after these steps too
    faults: FaultConfig = field(default_factory=FaultConfig)

    def validate(self) -> None:
        if self.advantage not in ESTIMATORS:
            raise ConfigError(f"advantage must be one of {', '.join(ESTIMATORS)}, got {self.advantage!r}")
        if self.advantage != "reinforce_pp" and self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be >= 2 for advantage={self.advantage} (a group baseline "
                              f"needs two samples), got {self.samples_per_prompt}")
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.prompts_per_step < 1:
            raise ConfigError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        check_on_policy_run(self, "steps", ("policy", "reference", "reward", "generator", "judge"))
        u = self.update
        check_on_policy_sampling("rollout", self.rollout)
        check_update(self.update_config(), {**{f.name: f"update.{f.name}" for f in dataclasses.fields(u)},
                                            "kl_in_loss_coef": "kl_coef", "temperature": "rollout.temperature",
                                            "seed": "seed"})
        if u.kl_estimator != U.kl_estimator and not KL_IN_LOSS[self.advantage]:
            raise ConfigError(f"update.kl_estimator is the in-loss KL's; advantage={self.advantage} puts the KL "
                              f"in the reward (k1): drop it")
        if not 0 <= u.gamma <= 1:
            raise ConfigError(f"update.gamma must be in [0, 1], got {u.gamma}")

    def update_config(self) -> PPOUpdateConfig:
        """What the policy's ``train_ppo`` receives: the update's knobs, the KL in the loss for the estimators
        that put it there (KL_IN_LOSS), log-probs at ``rollout.temperature``."""
        shared = {f.name: getattr(self.update, f.name) for f in dataclasses.fields(PPOUpdateConfig)
                  if hasattr(self.update, f.name)}
        return PPOUpdateConfig(**shared, kl_in_loss_coef=self.kl_coef if KL_IN_LOSS[self.advantage] else 0.0,
                               temperature=self.rollout.temperature, seed=self.seed)


def score_rollout(config: PolicyGradientConfig, fleet: Fleet, rollout, completions, temperature: float):
    """(policy log-probs, reference log-probs, reward scores) of one rollout, at ``temperature``: PPO's
    ``score_rollout`` on a fleet without a critic. With a thread budget, the frozen pair first (half the threads
    each) and then the policy alone on all of them: three passes at full width at once over-subscribed two
    cores (SmolLM2, 16 sequences of 24 new tokens, torch_threads=2: scoring 7.9 -> 2.5 s, a step 19.6 ->
    14.3 s, the same rewards; README, performance). Without one, all three at once, one thread each."""
    results = ppo_score_rollout(config, fleet, rollout, [c.prompt_ids for c in completions],
                                [c.response_ids for c in completions], temperature)
    return results["policy"], results["reference"], results["reward"]


def build_fleet(config: PolicyGradientConfig) -> Fleet:
    """PPO's roles without the critic (the whole point of these estimators)."""
    resources = ActorResources(torch_threads=config.torch_threads)
    frozen = dataclasses.replace(resources, torch_threads=frozen_threads(config.torch_threads),
                                 max_restarts=config.faults.frozen_role_restarts,
                                 max_task_retries=config.faults.frozen_role_restarts)
    place = lambda role: role_resources(frozen if role in ("reference", "reward") else resources,
                                        config.placement, role)
    common = {"seed": config.seed}
    micro = config.update.micro_batch_size
    reward_kwargs = ({"kind": "gold", "scorer": config.reward.scorer, "tokenizer": config.model}
                     if config.reward.kind == "gold" else {"kind": "learned", "model": config.reward.model})
    made: dict[str, ActorGroup] = {}
    try:
        made["policy"] = ActorGroup(PolicyActor, "policy", resources=place("policy"), init_kwargs={
            "model": config.model, "optimizer": dataclasses.asdict(config.optimizer), "micro_batch_size": micro,
            **common})
        made["reference"] = ActorGroup(ReferenceActor, "reference", resources=place("reference"), init_kwargs={
            "model": config.reference_model or config.model, "micro_batch_size": micro, **common})
        made["reward"] = ActorGroup(RewardModelActor, "reward", resources=place("reward"),
                                    init_kwargs={**reward_kwargs, **common})
        made["generator"] = ActorGroup(GenerationActor, "generator", num_actors=config.num_generators,
                                       indexed_names=True, resources=place("generator"), init_kwargs={
                                           "model": config.model, "backend": config.generation_backend,
                                           "backend_options": config.generation_options, **common})
        if config.eval_scorer:
            made["judge"] = ActorGroup(RewardModelActor, "judge", resources=role_resources(
                dataclasses.replace(frozen, num_cpus=0.5, torch_threads=1), config.placement, "judge"),
                init_kwargs={"kind": "gold", "scorer": config.eval_scorer, "tokenizer": config.model})
        for group in made.values():
            group.call_timeout_s = config.faults.call_timeout_s
            group.wait_ready()
    except BaseException:
        for group in made.values():
            group.shutdown()
        raise
    return Fleet(policy=made["policy"], reference=made["reference"], reward=made["reward"], critic=None,
                 generators=made["generator"], judge=made.get("judge"))


def compute_advantages(config: PolicyGradientConfig, scores: torch.Tensor, old_logprobs: torch.Tensor,
                       ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] token advantages of one rollout (rows grouped k per prompt, contiguous)."""
    k = config.samples_per_prompt
    if config.advantage == "reinforce_pp":
        adv, _ = reinforce_pp_advantages(scores, old_logprobs, ref_logprobs, mask, config.kl_coef,
                                         gamma=config.update.gamma)
        return adv * mask
    if not KL_IN_LOSS[config.advantage]:  # RLOO (Ahmadian et al.): the sequence KL penalty is part of the reward
        scores = scores - config.kl_coef * (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(-1)
    return to_tokens(sequence_advantages(config.advantage, scores, k), mask)


def train(config: PolicyGradientConfig) -> dict:
    return run_prompt_job(config, _train_attempt)


def _train_attempt(config: PolicyGradientConfig, pad_id: int, train_ids, eval_ids, resume_from: Path | None,
                   recoveries: int, faults: FaultInjector) -> dict:
    out = Path(config.output_dir) / config.run_name
    fleet = build_fleet(config)
    try:
        kl_in_loss = KL_IN_LOSS[config.advantage]
        update = config.update_config()
        state = {"step": 0, "tokens_generated": 0, "tokens_trained": 0, "first_eval": {}, "last_eval": {}}
        loop = open_policy_loop(config, out, fleet, len(train_ids), config.prompts_per_step, "step", config.steps,
                                state, resume_from, lambda: evaluate(fleet, eval_ids, config, pad_id))
        state, prompt_batches, guard = loop.state, loop.prompt_batches, loop.guard
        run_eval = (lambda: evaluate(fleet, eval_ids, config, pad_id)) if eval_ids else None
        bar = tqdm(range(state["step"] + 1, config.steps + 1), desc=config.advantage, unit="step",
                   dynamic_ncols=True, initial=state["step"], total=config.steps)
        for step in bar:
            t_step = time.perf_counter()
            index = prompt_batches.next()
            faults.maybe_kill(step, fleet.groups())
            timing: dict[str, float] = {}
            t0 = time.perf_counter()
            sampling = dataclasses.replace(config.rollout, n=config.samples_per_prompt,
                                           seed=config.seed * 100_003 + step)
            completions = generate_sharded(fleet.generators, [train_ids[i] for i in index], sampling)
            # the estimators read rows g·k … g·k + k − 1 as prompt g's group: make that order explicit
            completions = sorted(completions, key=lambda c: c.prompt_index)
            rollout = make_rollout(completions, pad_id)
            timing["generate"] = time.perf_counter() - t0
            mask = rollout.mask

            t0 = time.perf_counter()
            # log-probs at the rollout temperature: the distribution the generators sampled from
            policy_lp, reference_lp, reward = score_rollout(config, fleet, rollout, completions, sampling.temperature)
            timing["score"] = time.perf_counter() - t0
            old_logprobs, ref_logprobs = policy_lp["token_logps"], reference_lp["token_logps"]
            scores = reward["scores"].clone()
            if config.reward.missing_eos_penalty is not None:
                scores = scores - config.reward.missing_eos_penalty * torch.tensor(
                    [float(c.finish_reason != "stop") for c in completions])
            if config.reward.clip is not None:
                scores = scores.clamp(-config.reward.clip, config.reward.clip)

            advantages = compute_advantages(config, scores, old_logprobs, ref_logprobs, mask)
            if faults.poison(step):
                advantages = advantages * float("nan")
            seq_kl = (kl_estimate(old_logprobs, ref_logprobs, "k1") * mask).sum(-1)

            t0 = time.perf_counter()
            actor = fleet.policy.run_one("train_ppo", rollout.batch, old_logprobs, advantages, update,
                                         ref_logprobs if kl_in_loss else None)
            timing["update_actor"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fleet.push_weights(step)
            timing["sync_weights"] = time.perf_counter() - t0
            timing["step"] = time.perf_counter() - t_step

            generated = int(mask.sum())
            state["tokens_generated"] += generated
            # every token the update's passes read (all epochs): the compute ledger's trained tokens, as PPO's
            state["tokens_trained"] = state.get("tokens_trained", 0) + int(actor["tokens"])
            metrics = {**{k: v for k, v in actor.items() if k.startswith("actor/")},
                       "actor/grad_norm": actor["grad_norm"], "actor/lr": actor["lr"],
                       "reward/score_mean": float(reward["scores"].mean()),
                       "reward/score_std": float(reward["scores"].std()),
                       "advantage/mean": float(masked_mean(advantages, mask)),
                       "advantage/abs_mean": float(masked_mean(advantages.abs(), mask)),
                       "objective/kl": float(seq_kl.mean()), "objective/kl_coef": config.kl_coef,
                       "rollout/logprob_diff": float(masked_mean((rollout.generator_logprobs - old_logprobs).abs(),
                                                                 mask)),
                       "response_length/mean": float(mask.sum(-1).mean()),
                       "perf/tokens_per_s": generated / timing["step"],
                       "skipped_nonfinite": actor["skipped_nonfinite"],
                       **{f"timing_s/{k}": v for k, v in timing.items()}}
            loop.end_step(step, index, metrics, run_eval, save_policy_only(fleet.policy))
            bar.set_postfix(score=f"{metrics['reward/score_mean']:+.3f}", kl=f"{metrics['objective/kl']:.2f}")
        checkpoint = loop.finish()
    finally:
        fleet.shutdown()
    summary = {"method": config.advantage, "steps": config.steps, "checkpoint": str(checkpoint),
               "snapshots": saved_snapshots(out, config.snapshot_steps),
               "wall_s": loop.wall_s(), "tokens_generated": state["tokens_generated"],
               "tokens_trained": state.get("tokens_trained", 0), "start": state["first_eval"],
               "end": state["last_eval"], "recoveries": recoveries,
               "resumed_from": str(resume_from) if resume_from else None, "faults_injected": faults.killed,
               "nonfinite_skipped_steps": guard.skipped_steps, "roles": sorted(fleet.groups())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"[done] {config.steps} steps of {config.advantage}; checkpoint {checkpoint}")
    return summary


def main(argv=None) -> int:
    return run_cli(PolicyGradientConfig, train, "python -m jobs.policy_gradient", __doc__, argv,
                   "key.sub=value overrides, e.g. advantage=rloo samples_per_prompt=4")


if __name__ == "__main__":
    raise SystemExit(main())
