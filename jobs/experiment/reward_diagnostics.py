"""Does the learned reward model track the gold reward? Diagnostics for the comparison's report.

Three numbers answer it, all on data the reward model never trained on:
- ``accuracy``: held-out pairwise accuracy on gold-labelled pairs whose prompts were held out of
  reward-model training (the reward job's end-of-training evaluation);
- ``spearman``: the rank correlation between the reward model's score and the gold score of the SFT
  policy's samples on the evaluation prompts (the Best-of-N pool: prompts no stage trained on);
- ``pool_pair_accuracy``: on the same pool, the fraction of within-prompt pairs (gold scores differ
  by more than ``gap``) that the reward model orders as the gold scorer does.

And Best-of-N at each N against Best-of-1, as paired prompt-level differences: the expected gold
reward of the pick (exact mean over every N-subset of a prompt's pool) minus the pool's mean, per
prompt, bootstrapped over prompts.

A reward model below ``WEAK_ACCURACY`` held-out accuracy is called weak, and the report then says
that Best-of-N's fall with N reflects a reward model that did not learn the task, not over-optimisation.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from actors.math.best_of_n import expected_best_of_n, n_values
from jobs.experiment.stats import bootstrap_ci, significant

WEAK_ACCURACY = 0.75


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties): Pearson's r of the ranks."""
    x, y = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two equal-length series of at least 2 values, got {len(x)}, {len(y)}")
    return float(x.rank().corr(y.rank()))


def pool_pair_accuracy(pool: pd.DataFrame, gap: float = 0.0) -> tuple[float, int]:
    """Within each prompt, every pair of samples whose gold scores differ by more than ``gap``: the
    fraction the reward model orders like the gold scorer (a reward-model tie counts one half)."""
    right, pairs = 0.0, 0
    for _, group in pool.groupby("prompt_index"):
        rm, gold = group["reward_model_score"].to_numpy(), group["gold_score"].to_numpy()
        for i, j in itertools.combinations(range(len(gold)), 2):
            if abs(gold[i] - gold[j]) <= gap:
                continue
            agree = np.sign(rm[i] - rm[j]) * np.sign(gold[i] - gold[j])
            right += 1.0 if agree > 0 else (0.5 if agree == 0 else 0.0)
            pairs += 1
    return (right / pairs if pairs else float("nan")), pairs


def reward_model_diagnostics(reward_summary: dict, pool: pd.DataFrame | None, *, gap: float = 0.0,
                             seed: int = 0) -> dict:
    """The reward model's held-out accuracy (from its training stage's summary) and, on the SFT
    policy's samples of the evaluation prompts (``pool``: reward_model_score, gold_score,
    prompt_index), its Spearman correlation with gold (with a prompt-level bootstrap CI) and its
    within-prompt pair accuracy."""
    end = reward_summary.get("end") or {}
    out = {"accuracy": end.get("eval/accuracy", float("nan")), "eval_pairs": int(reward_summary.get("eval_pairs", 0)),
           "train_pairs": int(reward_summary.get("train_pairs", 0)), "steps": int(reward_summary.get("steps", 0)),
           "accuracy_at_start": (reward_summary.get("start") or {}).get("eval/accuracy", float("nan"))}
    if pool is not None and len(pool) >= 2:
        out["spearman"] = spearman(pool["reward_model_score"], pool["gold_score"])
        prompts = pool["prompt_index"].unique()
        rng = np.random.default_rng(seed)
        groups = {p: g for p, g in pool.groupby("prompt_index")}
        draws = []
        for _ in range(500):  # resample prompts, keep each prompt's samples together
            picked = pd.concat([groups[p] for p in rng.choice(prompts, size=len(prompts))])
            draws.append(spearman(picked["reward_model_score"], picked["gold_score"]))
        out["spearman_ci_low"], out["spearman_ci_high"] = (float(v) for v in np.nanquantile(draws, [0.025, 0.975]))
        out["pool_pair_accuracy"], out["pool_pairs"] = pool_pair_accuracy(pool, gap)
        out["pool_samples"] = int(len(pool))
    out["weak"] = bool(not out["accuracy"] >= WEAK_ACCURACY)  # NaN (not measured) counts as weak
    return out


def best_of_n_differences(pool: pd.DataFrame, max_n: int, *, seed: int = 0) -> pd.DataFrame:
    """Best-of-N minus Best-of-1 in gold reward, per prompt, for every N of the Best-of-N table:
    paired over the same prompts, with a prompt-level bootstrap CI (rows named ``best-of-N``)."""
    per_prompt = {}
    for prompt, group in pool.sort_values(["prompt_index", "sample_index"]).groupby("prompt_index"):
        rm, gold = group["reward_model_score"].to_numpy(), group["gold_score"].to_numpy()
        per_prompt[prompt] = {n: expected_best_of_n(rm, gold, n) for n in n_values(max_n) if n <= len(gold)}
    frame = pd.DataFrame.from_dict(per_prompt, orient="index")
    rows = []

    def add(a: int, b: int) -> None:
        diff = (frame[a] - frame[b]).to_numpy()
        low, high = bootstrap_ci(diff, seed=seed)
        rows.append({"a": f"best-of-{a}", "b": f"best-of-{b}", "diff": float(diff.mean()), "ci_low": low, "ci_high": high})

    for n in frame.columns[1:]:
        add(n, 1)
    # Over-optimisation is a fall from the best N to the largest: that fall, paired, is its own row.
    means = frame.mean()
    peak, last = int(means.idxmax()), int(frame.columns[-1])
    if peak not in (1, last):
        add(last, peak)
    return pd.DataFrame(rows, columns=["a", "b", "diff", "ci_low", "ci_high"])


def reward_model_sentences(diagnostics: dict, bon_differences: pd.DataFrame | None) -> list[str]:
    """What the report says of the reward model and of Best-of-N's curve, from the numbers."""
    d = diagnostics
    line = (f"Learned reward model: held-out pairwise accuracy {d['accuracy']:.2f} on {d['eval_pairs']} gold-labelled "
            f"pairs of held-out prompts (trained on {d['train_pairs']} pairs, {d['steps']} steps)")
    if "spearman" in d:
        line += (f"; Spearman correlation with the gold score {d['spearman']:.2f} "
                 f"[{d['spearman_ci_low']:.2f}, {d['spearman_ci_high']:.2f}] and within-prompt pair accuracy "
                 f"{d['pool_pair_accuracy']:.2f} on {d['pool_samples']} SFT samples of the evaluation prompts")
    out = [line + "."]
    if d["weak"]:
        out.append(f"The reward model is weak (held-out accuracy below {WEAK_ACCURACY:.2f}): what PPO and Best-of-N do "
                   "with it reflects a reward model that did not learn the gold preference: a fall of gold reward under "
                   "such a proxy says nothing about optimising against a good one.")
    if bon_differences is not None and not bon_differences.empty:
        vs_one = bon_differences[bon_differences["b"] == "best-of-1"]
        parts = "; ".join(f"{r.a} {r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" for r in vs_one.itertuples())
        out.append(f"Best-of-N (learned reward) minus Best-of-1 in gold reward, paired over prompts: {parts}.")
        fall = bon_differences[bon_differences["b"] != "best-of-1"]
        for r in fall.itertuples():
            if not significant(r.ci_low, r.ci_high) or r.diff >= 0:
                out.append(f"{r.a} − {r.b} (the largest N against the best one) is {r.diff:+.3f} "
                           f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]: no significant fall at large N.")
            elif d["weak"]:
                out.append(f"{r.a} − {r.b}: {r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], a significant fall "
                           "at large N from a weak reward model (see above).")
            else:
                out.append(f"{r.a} − {r.b}: {r.diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], a significant fall "
                           "at large N while the reward model's own score keeps rising: reward-model over-optimisation.")
        if not any(significant(r.ci_low, r.ci_high) and r.diff > 0 for r in vs_one.itertuples()):
            out.append("No N of Best-of-N is significantly above Best-of-1 in gold reward.")
    return out
