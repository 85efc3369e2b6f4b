"""A deterministic, prompt-grouped train/eval split and a seeded shuffle."""

from __future__ import annotations

import random
from collections.abc import Iterable

from jobs.data.records import Record, _prompt_key


def _eval_group_count(groups: int, eval_fraction: float | None, eval_size: int | None) -> int:
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction and eval_size")
    if eval_fraction is not None:
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        count = round(groups * eval_fraction)
        if eval_fraction > 0 and groups >= 2:
            count = max(count, 1)
        return min(count, max(groups - 1, 0))
    if eval_size < 0 or (eval_size > 0 and eval_size >= groups):
        raise ValueError(f"eval_size={eval_size} must leave training prompts: there are {groups} distinct prompts")
    return eval_size


def split_records(records: Iterable[Record], eval_fraction: float | None = None, *, eval_size: int | None = None,
                  seed: int = 0) -> tuple[list, list]:
    """Split records into (train, eval), both shuffled, from ``seed`` alone.

    All records sharing a prompt land on the same side, so no eval prompt is trained on (TL;DR has
    many comparisons per post). Sizes count distinct prompts: splitting pairs and the prompts drawn
    from them (:func:`prompts_from_pairs`, :func:`load_prompts`) with the same seed puts each
    prompt on the same side, which is how PPO and DPO share one split. Independent of the Python
    hash seed: groups are kept in first-seen order and shuffled with ``random.Random(seed)``.
    """
    records = list(records)
    groups: dict[tuple, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(_prompt_key(record.prompt), []).append(index)
    members = list(groups.values())
    eval_count = _eval_group_count(len(members), eval_fraction, eval_size)
    rng = random.Random(seed)
    order = list(range(len(members)))
    rng.shuffle(order)
    eval_indices = [i for group in order[:eval_count] for i in members[group]]
    train_indices = [i for group in order[eval_count:] for i in members[group]]
    rng.shuffle(train_indices)
    rng.shuffle(eval_indices)
    return [records[i] for i in train_indices], [records[i] for i in eval_indices]


def shuffled(records: Iterable[Record], seed: int) -> list:
    """A seeded shuffle (a new list), e.g. one per epoch with ``seed + epoch``."""
    records = list(records)
    random.Random(seed).shuffle(records)
    return records
