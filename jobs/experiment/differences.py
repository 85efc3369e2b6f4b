"""Paired comparisons of the runs' gold reward (prompt-level bootstrap over the prompts both runs
evaluated) and the summary sentences that state them: every run vs SFT, best DPO vs best PPO, the leader
vs each other method's best, and the best run each method reaches within one compute budget."""

from __future__ import annotations

import pandas as pd

from jobs.experiment.stats import paired_difference, significant


def paired_gold_difference(evaluations: dict, a: str, b: str, temperature: float, seed: int) -> tuple[float, float, float]:
    """Gold reward of run ``a`` minus run ``b`` at ``temperature``, paired over their common prompts."""
    at_a, at_b = (evaluations[r][evaluations[r]["temperature"] == temperature] for r in (a, b))
    return paired_difference(at_a, at_b, "gold", seed=seed)


def paired_differences(runs: pd.DataFrame, evaluations: dict, temperature: float, seed: int = 0) -> pd.DataFrame:
    """Gold-reward differences a − b over the held-out prompts both evaluated, at the KL temperature,
    each with a paired prompt-level bootstrap CI: every trained run vs SFT, best DPO vs best PPO, and the
    highest-scoring run vs each other method's best run (see ``leader_pairs``)."""
    pairs = [(run, "SFT") for run in runs["run"] if run != "SFT"]
    best = best_runs(runs)
    if "DPO" in best and "PPO" in best:
        pairs.append((best["DPO"], best["PPO"]))
    pairs += [pair for pair in leader_pairs(runs) if pair not in pairs and pair[::-1] not in pairs]
    rows = []
    for a, b in pairs:
        diff, low, high = paired_gold_difference(evaluations, a, b, temperature, seed)
        rows.append({"a": a, "b": b, "temperature": temperature, "diff": diff, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["a", "b", "temperature", "diff", "ci_low", "ci_high"])


def best_runs(runs: pd.DataFrame) -> dict[str, str]:
    """{method: its highest-scoring run}."""
    return {m: g.loc[g["gold_reward"].idxmax(), "run"] for m, g in runs.groupby("method")}


def leader_pairs(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(highest-scoring trained run, each other trained method's best run): is the leader ahead of every
    other method, or only of some? The leader is picked on the same samples that test it, so these leads
    lean optimistic; a lead whose interval still includes 0 is no lead."""
    trained = runs[runs["method"] != "SFT"]
    if trained.empty:
        return []
    leader = trained.loc[trained["gold_reward"].idxmax()]
    return [(leader.run, run) for method, run in best_runs(trained).items() if method != leader.method]


def leader_sentences(runs: pd.DataFrame, differences: pd.DataFrame) -> list[str]:
    """One sentence: the highest-scoring run against each other method's best, significant or not."""
    pairs = leader_pairs(runs)
    if len(pairs) < 2 or differences.empty:  # with two methods the head-to-head row says it already
        return []
    method_of = dict(zip(runs["run"], runs["method"]))
    table = differences.set_index(["a", "b"])
    parts, behind = [], []
    for a, b in pairs:
        if (a, b) in table.index:
            row = table.loc[(a, b)]
            diff, low, high = row["diff"], row["ci_low"], row["ci_high"]
        else:  # the pair is in the table the other way round (best DPO − best PPO)
            row = table.loc[(b, a)]
            diff, low, high = -row["diff"], -row["ci_high"], -row["ci_low"]
        ahead = significant(low, high)
        parts.append(f"{method_of[b]} ({b}) {diff:+.3f} [{low:+.3f}, {high:+.3f}], "
                     f"{'significant' if ahead else 'not significant'}")
        if not ahead:
            behind.append(method_of[b])
    leader = pairs[0][0]
    tail = ("it is ahead of every other method at 95%" if not behind else
            f"it is not ahead of {', '.join(behind)} at 95%")
    return [f"The highest-scoring run, {leader} ({method_of[leader]}), against each other method's best run "
            f"(paired 95% CI; the leader is chosen on these samples, so its leads lean optimistic): "
            + "; ".join(parts) + f": {tail}."]


def difference_sentences(differences: pd.DataFrame) -> list[str]:
    """Which paired differences are significant at 95% (CI excludes 0) and which are not, in numbers."""
    if differences.empty:
        return []
    def text(row) -> str:
        return f"{row.a} − {row.b} {row.diff:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]"
    flags = [significant(r.ci_low, r.ci_high) for r in differences.itertuples()]
    yes = [text(r) for r, f in zip(differences.itertuples(), flags) if f]
    no = [text(r) for r, f in zip(differences.itertuples(), flags) if not f]
    out = []
    if yes:
        out.append("Significant at 95% (paired prompt-level bootstrap, CI excludes 0): " + "; ".join(yes) + ".")
    if no:
        out.append("Not significant at 95% (CI includes 0): " + "; ".join(no) + ".")
    return out


def compute_matched(runs: pd.DataFrame, evaluations: dict | None = None, temperature: float = 1.0, seed: int = 0,
                    cost: str = "total_cpu_s") -> pd.DataFrame:
    """The best gold reward each method reaches within one budget: the largest of the methods' cheapest
    runs, so every method has at least one run within it. The SFT starting point is excluded.

    With ``evaluations``, the first row also carries its lead over the second (``lead_over_next``: the
    paired prompt-level difference of the two best runs, with its CI), so a ranking by point estimates
    is never read as a result the intervals do not support."""
    trained = runs[runs["method"] != "SFT"]
    if trained.empty:
        return pd.DataFrame()
    budget = trained.groupby("method")[cost].min().max()
    rows = []
    for method, group in trained.groupby("method"):
        within = group[group[cost] <= budget]
        best = within.loc[within["gold_reward"].idxmax()] if len(within) else None
        rows.append({"method": method, "budget_cpu_s": budget, "runs_within_budget": len(within),
                     "best_run": None if best is None else best["run"],
                     "best_gold_reward": None if best is None else best["gold_reward"],
                     "ci_low": None if best is None else best["gold_reward_ci_low"],
                     "ci_high": None if best is None else best["gold_reward_ci_high"],
                     "kl_exact": None if best is None else best["kl_exact"]})
    table = pd.DataFrame(rows).sort_values("best_gold_reward", ascending=False, na_position="last")
    table = table.reset_index(drop=True).assign(lead_over_next=float("nan"), lead_ci_low=float("nan"),
                                                lead_ci_high=float("nan"))
    ranked = table.dropna(subset=["best_run"])
    if evaluations is not None and len(ranked) >= 2:
        diff, low, high = paired_gold_difference(evaluations, *ranked["best_run"].iloc[:2], temperature, seed)
        table.loc[ranked.index[0], ["lead_over_next", "lead_ci_low", "lead_ci_high"]] = [diff, low, high]
    return table


def compute_matched_sentences(matched: pd.DataFrame) -> list[str]:
    """The compute-matched ranking, and whether its leader's lead over the next method is significant."""
    matched = matched.dropna(subset=["best_gold_reward"]) if "best_gold_reward" in matched else matched
    if matched.empty:
        return []
    top = matched.iloc[0]
    head = (f"Within the same compute budget ({top.budget_cpu_s:.0f} CPU-seconds including reward-model, "
            f"preference-data and reference costs), the best gold reward of each method: "
            + "; ".join(f"{r.method} {r.best_gold_reward:.3f} ({r.best_run})" for r in matched.itertuples()))
    if len(matched) < 2:
        return [head + f"; only {top.method} has a run within it."]
    second = matched.iloc[1]
    lead = getattr(top, "lead_over_next", float("nan"))
    if pd.isna(lead):
        return [head + f". {top.method} ranks first by point estimate only: its lead over {second.method} was not "
                       "tested."]
    verdict = (f"significant at 95%, so {top.method} is ahead within this budget"
               if significant(top.lead_ci_low, top.lead_ci_high)
               else "not significant at 95%: no method is ahead within this budget")
    return [head + f". {top.method}'s lead over {second.method}: {lead:+.3f}, paired 95% CI "
                   f"[{top.lead_ci_low:+.3f}, {top.lead_ci_high:+.3f}], {verdict}."]
