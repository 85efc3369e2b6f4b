"""Which rows each optimizer step sees: seeded reshuffles, one pass over the data after another."""

from __future__ import annotations

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


def plan_steps(rows: int, batch_size: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps). ``max_steps`` caps multi-epoch runs and sets the length of a
    one-epoch run (so a small dataset can be trained on for longer than one pass)."""
    per_epoch = max(1, rows // batch_size)
    total = epochs * per_epoch
    if max_steps:
        total = min(total, max_steps) if epochs > 1 else max_steps
    return per_epoch, total
