"""The hyper-parameters of one PPO-style update, as the policy (``train_ppo``) and the critic (``train_value``)
receive them: one frozen dataclass, every knob's one default here.

The drivers' user-facing configs (``jobs.drivers.ppo_config.PPOHyper`` / ``KLConfig``, the critic-free
``jobs.drivers.policy_gradient.UpdateConfig``) expose these knobs under their own keys, take their defaults
from this class, validate them with :meth:`PPOUpdateConfig.validate` and hand the actors a
``PPOUpdateConfig`` (``PPOConfig.update_config``), so no knob can be read with a different fallback on the
far side of the Ray boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

# KL estimators the in-loss KL term may use (actors.math.ppo_math.kl_estimate's names).
LOSS_KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
class PPOUpdateConfig:
    epochs: int = 4                  # passes over the rollout; epoch 0 in rollout order (ratio exactly 1 at first)
    minibatch_size: int = 8          # sequences per optimizer step
    micro_batch_size: int = 8        # sequences per forward pass (gradient accumulation; never changes the step)
    clip_eps: float = 0.2            # ratio clipped to [1 − clip_eps, 1 + clip_eps_high]
    clip_eps_high: float | None = None  # upper clip ("clip-higher", DAPO); None: clip_eps (symmetric)
    value_clip: float | None = 0.2   # critic: V − V_old clipped to ±value_clip in the value loss; None: unclipped
    # Critic: its loss is multiplied by vf_coef. The critic is its own model with its own optimizer (not a
    # head sharing the policy's loss), so this only rescales its gradient: AdamW/RMSprop divide that scale out
    # again, and what remains is its effect on the optimizer's eps and on critic_optimizer.max_grad_norm (the
    # clip acts on the scaled gradient, i.e. at a raw norm of max_grad_norm / vf_coef). It is not a learning
    # rate: use critic_optimizer.lr for that. 0.1 is the value PPO runs here have always used.
    vf_coef: float = 0.1
    entropy_coef: float = 0.0        # policy: minus entropy_coef × the mean token entropy (at `temperature`)
    kl_in_loss_coef: float = 0.0     # policy: in-loss KL(π‖π_ref) coefficient; 0 = the KL is not in the loss
    kl_estimator: str = "k3"         # per-token estimator of that in-loss KL (k3 as GRPO; k1's gradient is 0 on average)
    temperature: float = 1.0         # log-probs of logits / temperature: the rollout's sampling temperature
    seed: int = 0                    # shuffling of the minibatches after epoch 0 (plus the actor's step count)

    def validate(self, keys: Mapping[str, str] | None = None) -> None:
        """Raise ValueError naming the offending knob, under the user's key for it where ``keys`` maps it."""
        name = lambda field: (keys or {}).get(field, field)
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("minibatch_size", self.minibatch_size >= 1, "must be >= 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, "must be >= 1"),
            ("clip_eps", 0 < self.clip_eps < 1, "must be in (0, 1)"),
            ("clip_eps_high", self.clip_eps_high is None or self.clip_eps_high > 0, "must be > 0 or null"),
            ("value_clip", self.value_clip is None or self.value_clip > 0, "must be > 0 or null"),
            ("vf_coef", self.vf_coef > 0, "must be > 0"),
            ("entropy_coef", self.entropy_coef >= 0, "must be >= 0"),
            ("kl_in_loss_coef", self.kl_in_loss_coef >= 0, "must be >= 0"),
            ("kl_estimator", self.kl_estimator in LOSS_KL_ESTIMATORS, f"must be one of {LOSS_KL_ESTIMATORS}"),
            ("temperature", self.temperature > 0, "must be > 0"),
        ]
        for field, ok, message in checks:
            if not ok:
                raise ValueError(f"{name(field)} {message}, got {getattr(self, field)!r}")

    @classmethod
    def coerce(cls, value: "PPOUpdateConfig | Mapping") -> "PPOUpdateConfig":
        """The dataclass itself, or one built from a mapping of its fields (an unknown key is a TypeError);
        validated either way."""
        config = value if isinstance(value, cls) else cls(**dict(value))
        config.validate()
        return config

    def replace(self, **changes) -> "PPOUpdateConfig":
        return dataclasses.replace(self, **changes)
