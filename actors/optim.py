"""Optimizers and schedules used by every trainable actor."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OptimizerConfig:
    name: str = "adamw"           # adamw | rmsprop
    lr: float = 1e-6
    weight_decay: float = 0.0
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0         # linear warmup from 0 to lr, then constant (the DPO paper's schedule)
    max_grad_norm: float | None = 1.0

    def validate(self, prefix: str = "optimizer") -> None:
        if self.name not in ("adamw", "rmsprop"):
            raise ValueError(f"{prefix}.name must be 'adamw' or 'rmsprop', got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"{prefix}.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"{prefix}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"{prefix}.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


def build_optimizer(params, config: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                 weight_decay=config.weight_decay)
    return torch.optim.RMSprop(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig):
    warmup = config.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)) if warmup else 1.0
    )
