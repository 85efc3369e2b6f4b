"""PPO's typed configuration: every key a preset may set, its default and its validation.

Kept apart from the training loop (:mod:`jobs.drivers.ppo`) so the config can be read, built and checked
(``jobs.compare`` validates every stage at start-up) without the loop's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.generation import GENERATION_BACKENDS
from actors.optim import OptimizerConfig
from actors.sampling import SamplingConfig
from jobs.data.source import DataConfig
from jobs.run.batching import TokenizeConfig
from jobs.run.checkpoint import CheckpointConfig
from jobs.run.cluster import TrainingRoleConfig, check_placement
from jobs.run.config import ConfigError, check_model, check_reward_source, check_scorer
from jobs.run.faults import FaultConfig


KL_ESTIMATORS = ("k1", "k2", "k3")


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
    in_loss: bool = False              # put the KL (k3) in the policy loss instead of the reward


@dataclass
class PPOHyper:
    epochs: int = 4
    minibatch_size: int = 8            # sequences per optimizer step
    micro_batch_size: int = 8          # sequences per forward pass
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
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
    faults: FaultConfig = field(default_factory=FaultConfig)

    def validate(self) -> None:
        self.policy.validate("policy")
        self.critic.validate("critic", ("policy",))
        if self.critic.colocate_with == "policy" and self.policy.num_workers < 2:
            raise ConfigError("critic.colocate_with: policy needs a sharded policy (policy.num_workers >= 2) whose "
                              f"placement group the critic can share; policy.num_workers is {self.policy.num_workers}")
        self.checkpoint.validate()
        self.faults.validate()
        self.data.validate()
        self.tokenize.validate()
        self.rollout.validate("rollout")
        self.optimizer.validate("optimizer")
        self.critic_optimizer.validate("critic_optimizer")
        check_reward_source("reward", self.reward)
        if self.kl.estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl.estimator must be one of {KL_ESTIMATORS}, got {self.kl.estimator!r}")
        if self.kl.coef < 0:
            raise ConfigError(f"kl.coef must be >= 0, got {self.kl.coef}")
        if self.kl.adaptive and (self.kl.target <= 0 or self.kl.horizon <= 0):
            raise ConfigError("kl.target and kl.horizon must be > 0 for the adaptive controller")
        for key in ("prompts_per_step", "steps", "num_generators", "eval_samples_per_prompt"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        hp = self.ppo
        for key in ("epochs", "minibatch_size", "micro_batch_size"):
            if getattr(hp, key) < 1:
                raise ConfigError(f"ppo.{key} must be >= 1, got {getattr(hp, key)}")
        if hp.minibatch_size % hp.micro_batch_size:
            raise ConfigError(f"ppo.minibatch_size ({hp.minibatch_size}) must be a multiple of ppo.micro_batch_size "
                              f"({hp.micro_batch_size})")
        if not 0 < hp.clip_eps < 1:
            raise ConfigError(f"ppo.clip_eps must be in (0, 1), got {hp.clip_eps}")
        if not (0 <= hp.gamma <= 1 and 0 <= hp.lam <= 1):
            raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {hp.gamma}, {hp.lam}")
        if self.generation_backend not in GENERATION_BACKENDS:
            raise ConfigError(f"generation_backend must be one of {', '.join(GENERATION_BACKENDS)}, "
                              f"got {self.generation_backend!r}")
        if self.generation_backend == "hf" and self.generation_options:
            raise ConfigError("generation_options apply to the vllm backend only (generation_backend is hf)")
        for key in ("model", "reference_model", "critic_model"):
            check_model(key, getattr(self, key))
        check_scorer("eval_scorer", self.eval_scorer)
        check_placement(self.placement, ("policy", "reference", "reward", "critic", "generator", "judge"))
        if self.policy.lora and self.reference_model not in (None, self.model):
            raise ConfigError(f"reference_model: with policy.lora the reference is the policy's own base model "
                              f"(adapters disabled), so it cannot be {self.reference_model!r}; drop reference_model")
