"""Statistics for evaluation reports: seeded percentile-bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
                 statistic=np.mean) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over ``values`` (1-d). A single value gives (v, v)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-d array, got shape {values.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if values.size == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, values.size, size=(resamples, values.size))
    stats = statistic(values[draws], axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def prompt_means(frame, column: str, prompt: str = "prompt_index"):
    """Per-prompt mean of ``column`` (a pandas Series indexed by prompt, sorted)."""
    return frame.groupby(prompt)[column].mean().sort_index()


def prompt_bootstrap(frame, column: str, *, prompt: str = "prompt_index", confidence: float = 0.95,
                     resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of ``column``, resampling PROMPTS: a prompt's samples move together,
    because samples of one prompt are correlated and resampling them singly understates the spread.
    The estimate is the mean of per-prompt means (every prompt weighs the same)."""
    means = prompt_means(frame, column, prompt).to_numpy()
    low, high = bootstrap_ci(means, confidence=confidence, resamples=resamples, seed=seed)
    return float(means.mean()), low, high


def paired_difference(a, b, column: str, *, prompt: str = "prompt_index", confidence: float = 0.95,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(diff, ci_low, ci_high) of mean(a) − mean(b) over the prompts both evaluated, resampling those
    prompts jointly: the per-prompt difference is bootstrapped, so what a prompt adds to both sides
    (an easy or a hard opening) cancels instead of widening the interval."""
    a_means, b_means = prompt_means(a, column, prompt), prompt_means(b, column, prompt)
    common = a_means.index.intersection(b_means.index)
    if len(common) == 0:
        raise ValueError(f"paired_difference: the two runs share no {prompt}")
    diff = (a_means.loc[common] - b_means.loc[common]).to_numpy()
    low, high = bootstrap_ci(diff, confidence=confidence, resamples=resamples, seed=seed)
    return float(diff.mean()), low, high


def significant(low: float, high: float) -> bool:
    """A 95% interval that excludes 0."""
    return low > 0 or high < 0
