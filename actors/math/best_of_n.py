"""Best-of-N math: the analytic KL of the Best-of-N policy and an unbiased estimate of its reward.

Pure functions (no Ray, no models) so they can be tested exactly.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def best_of_n_kl(n: int) -> float:
    """log N − (N−1)/N nats: an upper bound on KL(Best-of-N || base) (Stiennon et al. 2020; Beirami et al.
    2024), exact only in the limit where every outcome's probability goes to 0 (a continuum of distinct
    outcomes); for the finite vocabularies sampled here the true KL is smaller."""
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def n_values(max_n: int) -> list[int]:
    """1, 2, 4, ... up to ``max_n``, with ``max_n`` itself last when it is not a power of two."""
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    values = [2**k for k in range(max_n.bit_length()) if 2**k <= max_n]
    return values if values[-1] == max_n else values + [max_n]


def best_of_n_selection_weights(pool_size: int, n: int) -> np.ndarray:
    """P(the k-th smallest of ``pool_size`` items is the largest of a uniformly random ``n``-subset),
    for k = 1..pool_size: C(k−1, n−1) / C(pool_size, n)."""
    if not 1 <= n <= pool_size:
        raise ValueError(f"need 1 <= n <= pool size, got n={n}, pool size={pool_size}")
    total = math.comb(pool_size, n)
    return np.array([math.comb(k - 1, n - 1) / total for k in range(1, pool_size + 1)])


def expected_best_of_n(selector: Sequence[float], target: Sequence[float], n: int) -> float:
    """Expected ``target`` of the sample with the highest ``selector`` among N drawn from a pool.

    The pool holds ``M >= N`` i.i.d. samples of one prompt. Averaging over all C(M, N) subsets of
    the pool is an unbiased estimate of the Best-of-N value (the same construction as pass@k), with
    lower variance than drawing subsets at random. Ties in ``selector`` are broken uniformly at
    random, so tied samples contribute their mean ``target``.
    """
    selector = np.asarray(selector, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if selector.shape != target.shape or selector.ndim != 1:
        raise ValueError(f"selector and target must be equal-length 1-d arrays, got {selector.shape}, {target.shape}")
    order = np.argsort(selector, kind="stable")
    sorted_selector, sorted_target = selector[order], target[order]
    # Replace each run of tied selector values by its mean target (uniform tie-breaking).
    _, starts, counts = np.unique(sorted_selector, return_index=True, return_counts=True)
    for start, count in zip(starts, counts):
        if count > 1:
            sorted_target[start:start + count] = sorted_target[start:start + count].mean()
    return float(best_of_n_selection_weights(len(selector), n) @ sorted_target)
