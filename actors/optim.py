"""Optimizers and schedules used by every trainable actor."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from actors.fsdp.state import DCP_FOLDER, TRAINER_STATE, load_sharded_state
from actors.runtime import rng_state, set_rng_state



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


# One micro-batch's forward pass: returns (mean loss over its rows, metrics to average by rows).
MicroLoss = Callable[[], tuple[torch.Tensor, dict[str, float]]]


class TrainableMixin:
    """The optimizer step every trainable actor shares (policy, reward model, critic).

    Expects ``self.model`` and ``self._autocast()``; call ``setup_optimizer`` in ``__init__``.
    """

    def setup_optimizer(self, optimizer: OptimizerConfig | dict | None) -> None:
        config = OptimizerConfig(**optimizer) if isinstance(optimizer, dict) else (optimizer or OptimizerConfig())
        config.validate()
        self.optimizer_config = config
        self.optimizer = build_optimizer(self.model.parameters(), config)
        if getattr(self, "offload_optimizer", False):  # ModelWorker option; see actors.offload
            from actors.offload import offload_optimizer_state

            self.optimizer = offload_optimizer_state(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.global_step = 0
        self.nonfinite_steps = 0

    def _optimizer_step(self, parts: list[tuple[int, MicroLoss]]) -> dict[str, float]:
        """Accumulate gradients over micro-batches weighted by their share of the (mini)batch, clip, step.

        ``parts`` holds (size, closure) pairs; each closure runs one micro-batch's forward pass and
        returns (its loss as a mean over the same unit, metrics). The unit is rows for sequence-mean
        losses and response tokens for token-mean ones (PPO's policy loss), so the accumulated loss is
        the (mini)batch's sum over that unit divided by its total. A non-finite loss or gradient skips the update
        (counted in ``skipped_nonfinite``; weights and optimizer state untouched).
        """
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_rows = sum(rows for rows, _ in parts)  # of the whole (mini)batch, over all workers
        sums: dict[str, float] = {}
        finite = True
        for part in self._my_share(parts):
            rows, run = part if part is not None else (0, self._idle_pass)
            with self._autocast():
                loss, metrics = run()
            weight = rows / total_rows
            finite &= bool(torch.isfinite(loss))
            if finite or self.lockstep:
                (loss * weight).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if k == "tokens" else weight)
        finite = self._all_finite(finite)
        sums = self._reduce_sums(sums)
        grad_norm = float("nan")
        if finite:
            max_norm = self.optimizer_config.max_grad_norm or float("inf")
            grad_norm = self._clip_grad_norm(max_norm)
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
        self.global_step += 1
        self.model.eval()
        sums.update({"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                     "skipped_nonfinite": float(not finite), "timing_s/update": time.perf_counter() - start})
        return sums

    # -- data parallelism: one worker here; actors.fsdp overrides these for FSDP2 groups ---------
    lockstep = False  # True: every worker runs every backward pass (sharded collectives must match)

    def _my_share(self, items: list) -> list:
        """The micro-batches this worker runs; ``None`` marks an idle pass that only keeps it in step."""
        return items

    def _idle_pass(self):
        raise NotImplementedError("idle passes exist only in sharded groups (actors.fsdp)")

    def _all_finite(self, finite: bool) -> bool:
        """Whether every worker's losses were finite (all skip the update together)."""
        return finite

    def _reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Row-weighted metric sums over all workers (each weighted by the global row count)."""
        return sums

    def _clip_grad_norm(self, max_norm: float) -> float:
        """Clip to ``max_norm`` by the norm of the whole gradient; returns that norm."""
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    # -- checkpoint state -------------------------------------------------------------------------
    def save_state(self, folder: str) -> str:
        """Everything this actor needs to continue training exactly where it is: weights, optimizer and
        schedule states, step counters and the process's RNG states. Written to a temporary name and
        renamed, so a crash mid-write never leaves a truncated file under the final name."""
        folder_path = Path(folder)
        folder_path.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "global_step": self.global_step,
                 "nonfinite_steps": self.nonfinite_steps, "rng": rng_state()}
        target = folder_path / TRAINER_STATE
        partial = target.with_name(target.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, target)
        return str(target)

    def load_state(self, folder: str) -> int:
        """Restore what ``save_state`` wrote (same model and optimizer shapes); returns the global step.
        A sharded group's checkpoint (``torch.distributed.checkpoint``, any world size) loads too."""
        if (Path(folder) / DCP_FOLDER).is_dir():
            return load_sharded_state(self, folder)
        state = torch.load(Path(folder) / TRAINER_STATE, map_location="cpu",
                           weights_only=False)  # our own file: RNG states are numpy/python objects
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = int(state["global_step"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        set_rng_state(state["rng"])
        self.model.eval()
        return self.global_step

