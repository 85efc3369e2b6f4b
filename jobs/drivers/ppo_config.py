"""PPO's typed configuration: every key a preset may set, its default and its validation.

Kept apart from the training loop (:mod:`jobs.drivers.ppo`) so the config can be read, built and checked
(``jobs.compare`` validates every stage at start-up) without the loop's machinery.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from actors.generation import GENERATION_BACKENDS
from actors.optim import OptimizerConfig
from actors.ppo_update import PPOUpdateConfig
from actors.sampling import SamplingConfig
from jobs.data.source import DataConfig
from jobs.run.batching import TokenizeConfig
from jobs.run.snapshots import check_snapshot_steps
from jobs.run.checkpoint import CheckpointConfig
from jobs.run.cluster import TrainingRoleConfig, check_placement
from jobs.run.config import ConfigError, check_model, check_reward_source, check_scorer
from jobs.run.faults import FaultConfig


KL_ESTIMATORS = ("k1", "k2", "k3")
U = PPOUpdateConfig  # the update knobs' one default each lives there; the sections below only expose them


@dataclass
class RewardConfig:
    kind: str = "gold"                 # gold (a scorer) | learned (a reward-model folder)
    scorer: str | None = "vader"       # for kind=gold: see actors.scorers
    model: str | None = None           # for kind=learned: output of jobs.reward
    missing_eos_penalty: float | None = None  # subtracted from the score of responses that never emit EOS
    clip: float | None = None          # clip scores to [-clip, clip]


@dataclass
class KLConfig:
    coef: float = 0.05
    estimator: str = "k1"              # per-token estimator in the reward penalty (k1 | k2 | k3)
    adaptive: bool = False             # Ziegler et al.'s proportional controller
    target: float = 6.0                # target sequence KL (nats) for the adaptive controller
    horizon: int = 10000
    in_loss: bool = False              # put the KL in the policy loss (coefficient coef, fixed or adaptive) instead of the reward
    loss_estimator: str = U.kl_estimator  # per-token estimator of the in-loss KL (k1 | k2 | k3)


@dataclass
class PPOHyper:
    """The update's knobs (meanings and defaults: actors.ppo_update.PPOUpdateConfig) and the driver's own."""
    epochs: int = U.epochs
    minibatch_size: int = U.minibatch_size      # sequences per optimizer step
    micro_batch_size: int = U.micro_batch_size  # sequences per forward pass
    clip_eps: float = U.clip_eps
    clip_eps_high: float | None = U.clip_eps_high  # asymmetric upper clip (DAPO's clip-higher); null: clip_eps
    value_clip: float | None = U.value_clip     # null: unclipped value loss
    # Scales the critic's loss only. The critic is a separate model with its own optimizer, so under AdamW this
    # is not a learning rate (Adam divides the scale out): it only moves where critic_optimizer.max_grad_norm
    # clips (at a raw gradient norm of max_grad_norm / vf_coef) and the weight of AdamW's eps. Use
    # critic_optimizer.lr to make the critic learn faster or slower.
    vf_coef: float = U.vf_coef
    entropy_coef: float = U.entropy_coef        # entropy bonus on the policy loss (at rollout.temperature)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    whiten_rewards: bool = False


@dataclass
class PPOConfig:
    run_name: str = "ppo"
    output_dir: str = "runs"
    seed: int = 0
    model: str = "smollm2"             # the starting policy (an SFT checkpoint in the full pipeline)
    reference_model: str | None = None  # default: the starting policy
    critic_model: str | None = None    # default: the reward model if learned, else the starting policy
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=lambda: TokenizeConfig(max_prompt_length=64, max_length=128))
    rollout: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48))
    prompts_per_step: int = 16
    steps: int = 20
    reward: RewardConfig = field(default_factory=RewardConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    ppo: PPOHyper = field(default_factory=PPOHyper)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-6, eps=1e-5))
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, eps=1e-5))
    num_generators: int = 1
    generation_backend: str = "auto"   # hf | vllm | auto (vLLM where installed and able to host the model)
    generation_options: dict[str, Any] = field(default_factory=dict)  # vLLM backend options (actors.vllm_backend)
    eval_every: int = 10               # steps; 0 = only at the start and the end
    eval_prompts: int = 32
    eval_samples_per_prompt: int = 1
    eval_scorer: str | None = "vader"  # gold scorer for evaluation (independent of the training reward)
    torch_threads: int | None = None
    address: str | None = None
    # Custom node resources per role, pinning it to nodes that offer them, e.g. {policy: {trainer: 1}}
    placement: dict[str, dict[str, float]] = field(default_factory=dict)
    policy: TrainingRoleConfig = field(default_factory=TrainingRoleConfig)  # num_workers > 1: FSDP2 group
    critic: TrainingRoleConfig = field(default_factory=TrainingRoleConfig)  # colocate_with: policy shares its bundles
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    snapshot_steps: list[int] = field(default_factory=list)  # save the policy (HF folder) after these steps too
    faults: FaultConfig = field(default_factory=FaultConfig)

    def validate(self) -> None:
        check_on_policy_run(self, "steps", ("policy", "reference", "reward", "critic", "generator", "judge"))
        self.critic.validate("critic", ("policy",))
        if self.critic.colocate_with == "policy" and self.policy.num_workers < 2:
            raise ConfigError("critic.colocate_with: policy needs a sharded policy (policy.num_workers >= 2) whose "
                              f"placement group the critic can share; policy.num_workers is {self.policy.num_workers}")
        self.critic_optimizer.validate("critic_optimizer")
        if self.kl.estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl.estimator must be one of {KL_ESTIMATORS}, got {self.kl.estimator!r}")
        if self.kl.coef < 0:
            raise ConfigError(f"kl.coef must be >= 0, got {self.kl.coef}")
        if self.kl.adaptive and (self.kl.target <= 0 or self.kl.horizon <= 0):
            raise ConfigError("kl.target and kl.horizon must be > 0 for the adaptive controller")
        if self.prompts_per_step < 1:
            raise ConfigError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        hp = self.ppo
        check_on_policy_sampling("rollout", self.rollout)
        check_update(self.update_config(), {**{f.name: f"ppo.{f.name}" for f in dataclasses.fields(hp)},
                                            "kl_in_loss_coef": "kl.coef", "kl_estimator": "kl.loss_estimator",
                                            "temperature": "rollout.temperature", "seed": "seed"})
        # each estimator reaches the code only where the KL is: a non-default one elsewhere would do nothing
        if self.kl.loss_estimator != U.kl_estimator and not self.kl.in_loss:
            raise ConfigError("kl.loss_estimator applies to the in-loss KL only: set kl.in_loss=true or drop it")
        if self.kl.estimator != KLConfig.estimator and self.kl.in_loss:
            raise ConfigError("kl.estimator is the reward penalty's; with kl.in_loss=true set kl.loss_estimator")
        if not (0 <= hp.gamma <= 1 and 0 <= hp.lam <= 1):
            raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {hp.gamma}, {hp.lam}")
        check_model("critic_model", self.critic_model)

    def update_config(self, kl_coef: float | None = None) -> PPOUpdateConfig:
        """What the policy's ``train_ppo`` and the critic's ``train_value`` receive: every knob of the update,
        from the section that exposes it. ``kl_coef``: the KL controller's current β (default ``kl.coef``),
        which enters the loss only with ``kl.in_loss``; the log-probs are at ``rollout.temperature``."""
        shared = {f.name: getattr(self.ppo, f.name) for f in dataclasses.fields(PPOUpdateConfig)
                  if hasattr(self.ppo, f.name)}
        coef = self.kl.coef if kl_coef is None else kl_coef
        return PPOUpdateConfig(**shared, kl_in_loss_coef=coef if self.kl.in_loss else 0.0,
                               kl_estimator=self.kl.loss_estimator, temperature=self.rollout.temperature,
                               seed=self.seed)


def check_update(update: PPOUpdateConfig, keys: dict[str, str]) -> None:
    """The update's knobs checked once (PPOUpdateConfig.validate), errors naming the user's keys."""
    try:
        update.validate(keys)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if update.minibatch_size % update.micro_batch_size:
        raise ConfigError(f"{keys['minibatch_size']} ({update.minibatch_size}) must be a multiple of "
                          f"{keys['micro_batch_size']} ({update.micro_batch_size})")


def check_on_policy_sampling(key: str, sampling: SamplingConfig) -> None:
    """Rollouts that a trainer scores as its own samples. The trainer's log-probs (old and new policy, the
    reference's for the KL) are of the whole distribution softmax(logits / T) at the rollout temperature T,
    so the sampler must draw from exactly that: T > 0 and no top-k / top-p truncation."""
    if sampling.temperature <= 0:
        raise ConfigError(f"{key}.temperature must be > 0 for rollouts (got {sampling.temperature}): greedy decoding "
                          f"has no sampling distribution for PPO's ratio and KL; use a low temperature instead")
    for name, off, value in (("top_k", 0, sampling.top_k), ("top_p", 1.0, sampling.top_p)):
        if value != off:
            raise ConfigError(f"{key}.{name} must be {off} for rollouts (got {value}): the trainer scores the "
                              f"untruncated distribution at {key}.temperature, so truncated sampling is off-policy; "
                              f"lower {key}.temperature to sharpen sampling instead")


def check_on_policy_run(config, length_key: str, roles: tuple[str, ...]) -> None:
    """The checks every on-policy driver's config shares (PPO, critic-free RL, online DPO), in one place:
    counts, the generation backend and its options, models and scorers, the policy's training role where
    the driver has one (LoRA's reference is its own base), placement of ``roles``, checkpoints, snapshots
    within ``length_key`` (steps or rounds), faults, data, tokenisation, sampling, the optimizer, the reward."""
    for key in (length_key, "num_generators", "eval_samples_per_prompt"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(config, key)}")
    if config.generation_backend not in GENERATION_BACKENDS:
        raise ConfigError(f"generation_backend must be one of {', '.join(GENERATION_BACKENDS)}, "
                          f"got {config.generation_backend!r}")
    if config.generation_backend == "hf" and config.generation_options:
        raise ConfigError("generation_options apply to the vllm backend only (generation_backend is hf)")
    for key in ("model", "reference_model"):
        check_model(key, getattr(config, key))
    check_scorer("eval_scorer", config.eval_scorer)
    check_placement(config.placement, roles)
    policy = getattr(config, "policy", None)
    if policy is not None:
        policy.validate("policy")
        if policy.lora and config.reference_model not in (None, config.model):
            raise ConfigError(f"reference_model: with policy.lora the reference is the policy's own base model "
                              f"(adapters disabled), so it cannot be {config.reference_model!r}; drop reference_model")
    config.checkpoint.validate()
    check_snapshot_steps("snapshot_steps", config.snapshot_steps, getattr(config, length_key))
    config.faults.validate()
    config.data.validate()
    config.tokenize.validate()
    config.rollout.validate("rollout")
    config.optimizer.validate("optimizer")
    check_reward_source("reward", config.reward)
