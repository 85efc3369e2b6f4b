"""Which rows each optimizer step sees: seeded reshuffles, one pass over the data after another."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


class ShuffledBatches:
    """Batches of indices into ``size`` rows: a fresh seeded permutation each pass, no row repeated
    within a pass, passes joined without gaps (a batch may straddle two passes)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < 1:
            raise ValueError("ShuffledBatches needs at least one row")
        self.size, self.batch_size = size, batch_size
        self.rng = np.random.default_rng(seed)
        self.pending: list[int] = []

    def next(self) -> list[int]:
        while len(self.pending) < self.batch_size:
            self.pending.extend(self.rng.permutation(self.size).tolist())
        batch, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
        return batch

    def indices_within(self, steps: int) -> list[int]:
        """The sorted distinct rows the next ``steps`` batches will draw, found on a copy (this sampler
        does not move): what a run of ``steps`` steps needs precomputed, and nothing more."""
        copy = ShuffledBatches(self.size, self.batch_size, 0)
        copy.load_state_dict(self.state_dict())
        seen: set[int] = set()
        for _ in range(steps):
            seen.update(copy.next())
            if len(seen) == self.size:
                break
        return sorted(seen)

    def state_dict(self) -> dict:
        """The position in the data: the generator's state and the rest of the current pass."""
        return {"size": self.size, "batch_size": self.batch_size, "rng": self.rng.bit_generator.state,
                "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        if (state["size"], state["batch_size"]) != (self.size, self.batch_size):
            raise ValueError(f"checkpointed data position is for {state['size']} rows in batches of "
                             f"{state['batch_size']}, this run has {self.size} rows in batches of {self.batch_size} "
                             "(the data or batch size changed since the checkpoint)")
        self.rng.bit_generator.state = state["rng"]
        self.pending = list(state["pending"])


def check_step_plan(config) -> None:
    """The step-plan fields SFT, reward-model training and DPO share, checked before any actor starts."""
    from jobs.run.config import ConfigError

    for key in ("batch_size", "micro_batch_size", "epochs"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(config, key)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1 or null, got {config.max_steps}")
    if config.eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0, got {config.eval_every}")


def plan_steps(rows: int, batch_size: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps). ``max_steps`` caps multi-epoch runs and sets the length of a
    one-epoch run (so a small dataset can be trained on for longer than one pass)."""
    per_epoch = max(1, rows // batch_size)
    total = epochs * per_epoch
    if max_steps:
        total = min(total, max_steps) if epochs > 1 else max_steps
    return per_epoch, total


@dataclass
class LoopState:
    """What a step loop carries from one step to the next, and what a checkpoint must restore."""

    step: int = 0                  # the last completed step
    tokens: int = 0
    last_eval: dict = field(default_factory=dict)


def supervised_steps(*, desc: str, total_steps: int, steps_per_epoch: int, batches: ShuffledBatches,
                     train_step, evaluate, eval_every: int, logger, postfix: dict[str, str],
                     state: LoopState | None = None, after_step=None, guard=None) -> LoopState:
    """The step loop SFT, reward-model training and DPO share: draw a batch, take one optimizer step on
    the actor (``train_step(indices, step) -> metrics`` with ``tokens``), time it, evaluate every
    ``eval_every`` steps and at the end (``evaluate() -> metrics``, or None), log, show progress.

    ``state`` continues a resumed run after its last completed step; ``guard`` (a
    ``jobs.run.checkpoint.NonFiniteGuard``) sees each step's metrics before anything is logged or saved
    and aborts after too many skipped updates in a row; ``after_step(state)`` runs after each logged
    step (the driver's checkpoint hook). Returns the final state.
    """
    from tqdm import tqdm

    state = state or LoopState()
    bar = tqdm(range(state.step + 1, total_steps + 1), desc=desc, unit="step", dynamic_ncols=True,
               initial=state.step, total=total_steps)
    for step in bar:
        start = time.perf_counter()
        index = batches.next()
        metrics = train_step(index, step)
        seconds = time.perf_counter() - start
        if guard is not None:
            guard.observe(step, index, metrics)
        state.tokens += int(metrics["tokens"])
        metrics.update({"timing_s/step": seconds, "perf/tokens_per_s": metrics["tokens"] / seconds,
                        "epoch": step / steps_per_epoch})
        if evaluate is not None and ((eval_every and step % eval_every == 0) or step == total_steps):
            state.last_eval = evaluate()
            metrics.update(state.last_eval)
        logger.log(step, metrics)
        state.step = step
        if after_step is not None:
            after_step(state)
        bar.set_postfix({name: format(metrics[key], spec) for name, (key, spec) in postfix.items()})
    return state
