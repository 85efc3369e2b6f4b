"""Which rows each optimizer step sees: seeded reshuffles, one pass over the data after another."""

from __future__ import annotations

import time

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


def check_step_plan(config) -> None:
    """The step-plan fields SFT, reward-model training and DPO share, checked before any actor starts."""
    from jobs.config import ConfigError

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


def supervised_steps(*, desc: str, total_steps: int, steps_per_epoch: int, batches: ShuffledBatches,
                     train_step, evaluate, eval_every: int, logger, postfix: dict[str, str]) -> tuple[int, dict]:
    """The step loop SFT, reward-model training and DPO share: draw a batch, take one optimizer step on
    the actor (``train_step(indices) -> metrics`` with ``tokens``), time it, evaluate every
    ``eval_every`` steps and at the end (``evaluate() -> metrics``, or None), log, show progress.

    Returns (tokens trained on, the last evaluation's metrics).
    """
    from tqdm import tqdm

    tokens, last_eval = 0, {}
    bar = tqdm(range(1, total_steps + 1), desc=desc, unit="step", dynamic_ncols=True)
    for step in bar:
        start = time.perf_counter()
        metrics = train_step(batches.next())
        seconds = time.perf_counter() - start
        tokens += int(metrics["tokens"])
        metrics.update({"timing_s/step": seconds, "perf/tokens_per_s": metrics["tokens"] / seconds,
                        "epoch": step / steps_per_epoch})
        if evaluate is not None and ((eval_every and step % eval_every == 0) or step == total_steps):
            last_eval = evaluate()
            metrics.update(last_eval)
        logger.log(step, metrics)
        bar.set_postfix({name: format(metrics[key], spec) for name, (key, spec) in postfix.items()})
    return tokens, last_eval
