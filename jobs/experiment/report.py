"""The comparison report: tables (CSV + Parquet), plots, and one self-contained HTML file.

Every sentence of the summary is computed from the tables; nothing is written by hand.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from jobs.experiment.evaluate import summarize, win_rates  # noqa: E402
from jobs.experiment.reward_diagnostics import reward_model_sentences  # noqa: E402
from jobs.experiment.differences import (compute_matched, compute_matched_sentences, difference_sentences,  # noqa: E402
                                         leader_sentences, paired_differences)
from jobs.experiment.stats import significant  # noqa: E402

METHOD_COLORS = {"SFT": "#555555", "PPO": "#1f77b4", "PPO-GT": "#17becf", "DPO": "#d62728",
                 "Preferred-FT": "#2ca02c", "Best-of-N": "#9467bd", "RLOO": "#ff7f0e", "GRPO": "#8c564b",
                 "Dr. GRPO": "#bcbd22", "REINFORCE++": "#e377c2", "Online DPO": "#7f0000", "Online DPO-GT": "#ff9896"}
TOKEN_KEYS = ("tokens_generated", "tokens_trained")


def _stage_compute(stages: dict, names: list[str]) -> dict:
    total = {"wall_s": 0.0, "cpu_s": 0.0, "device_s": 0.0, "tokens_generated": 0, "tokens_trained": 0}
    for name in names:
        stage = stages[name]
        for key in ("wall_s", "cpu_s", "device_s"):
            total[key] += stage.compute[key]
        for key in TOKEN_KEYS:
            total[key] += int(stage.summary.get(key, 0) or 0)
    return total


def build_tables(config, policies: dict, evaluations: dict, stages: dict, best_of_n: pd.DataFrame | None,
                 best_of_n_differences: pd.DataFrame | None = None) -> dict:
    rows, wins = [], []
    baseline = evaluations["SFT"]
    for run, info in policies.items():
        metrics = summarize(evaluations[run], config.eval, config.seed)
        # A snapshot at step s of S is charged s/S of its run's own stage; the stages it depends on in full.
        fraction = info.get("own_fraction", 1.0)
        own = {k: v * fraction for k, v in _stage_compute(stages, info["stages"][-1:]).items()}
        deps = _stage_compute(stages, info["stages"][:-1])
        total = {k: deps[k] + own[k] for k in own}
        rows.append({"run": run, "method": info["method"], "param": info["param"], "step": info.get("step"), **metrics,
                     **{f"own_{k}": v for k, v in own.items()}, **{f"total_{k}": v for k, v in total.items()},
                     "stages": "+".join(info["stages"])})
        table = win_rates(evaluations[run], baseline, config.seed)
        table.insert(0, "method", info["method"])
        table.insert(0, "run", run)
        wins.append(table)
    runs = pd.DataFrame(rows)
    tables = {"runs": runs, "win_rates": pd.concat(wins, ignore_index=True)}
    if best_of_n is not None:
        bon = best_of_n.copy()
        names = list(bon["stages"].iloc[0])
        deps, own = _stage_compute(stages, names[:-1]), _stage_compute(stages, names[-1:])
        # One pool of max_n samples serves every N; Best-of-N alone would sample N, so its own cost
        # is scaled by N / max_n (sampling dominates it), on top of the stages it depends on.
        share = bon["n"] / bon["n"].max()
        bon["total_cpu_s"] = deps["cpu_s"] + own["cpu_s"] * share
        bon["total_wall_s"] = deps["wall_s"] + own["wall_s"] * share
        tables["best_of_n"] = bon.drop(columns=["stages"])
    tables["compute_matched"] = compute_matched(runs, evaluations, config.eval.kl_temperature, config.seed)
    tables["differences"] = paired_differences(runs, evaluations, config.eval.kl_temperature, config.seed)
    if best_of_n_differences is not None and not best_of_n_differences.empty:
        bon_t = float((config.best_of_n or {}).get("temperature", 1.0))
        tables["differences"] = pd.concat([tables["differences"], best_of_n_differences.assign(temperature=bon_t)[
            ["a", "b", "temperature", "diff", "ci_low", "ci_high"]]], ignore_index=True)
    tables["examples"] = example_continuations(policies, evaluations, config.eval.kl_temperature)
    tables["stages"] = stage_table(stages, config.useful_work)
    return tables


def stage_table(stages: dict, rates) -> pd.DataFrame:
    """Per stage and in total: wall seconds, tokens trained and generated, and ``useful_fraction``, the
    share of the wall time that this machine's benchmark rates account for (tokens trained at the
    training step's tokens/s plus tokens generated at the generator's tokens/s): the rest is fixed cost
    (process and engine start, model loads, weight syncs, small-batch overhead)."""
    rows = []
    for s in stages.values():
        row = {"stage": s.name, "skipped": s.skipped, **s.compute,
               **{k: int(s.summary.get(k, 0) or 0) for k in TOKEN_KEYS}}
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["stage", "skipped", "wall_s", "cpu_s", "device_s", *TOKEN_KEYS])
    total = frame[~frame["skipped"]].drop(columns=["stage", "skipped"]).sum(numeric_only=True)
    frame = pd.concat([frame, pd.DataFrame([{"stage": "total (stages run now)", "skipped": False, **total.to_dict()}])],
                      ignore_index=True)
    work_s = frame["tokens_trained"] / rates.train_tokens_per_s + frame["tokens_generated"] / rates.generate_tokens_per_s
    frame["useful_fraction"] = (work_s / frame["wall_s"].where(frame["wall_s"] > 0)).clip(upper=1.0)
    return frame


def example_continuations(policies: dict, evaluations: dict, temperature: float, prompts: int = 3) -> pd.DataFrame:
    """The first sample of each run on the first few held-out prompts, at the KL temperature."""
    rows = []
    for run, info in policies.items():
        samples = evaluations[run]
        picked = samples[(samples["temperature"] == temperature) & (samples["sample_index"] == 0)]
        for _, row in picked.sort_values("prompt_index").head(prompts).iterrows():
            rows.append({"run": run, "method": info["method"], "prompt": row["prompt"], "continuation": row["response"],
                         "gold": row["gold"]})
    return pd.DataFrame(rows)


def summary_sentences(tables: dict) -> list[str]:
    runs = tables["runs"]
    sft = runs[runs["method"] == "SFT"].iloc[0]
    trained = runs[runs["method"] != "SFT"]
    out = [f"The SFT policy scores {sft.gold_reward:.3f} gold reward "
           f"(95% CI {sft.gold_reward_ci_low:.3f} to {sft.gold_reward_ci_high:.3f})."]
    if trained.empty:
        return out
    best = trained.loc[trained["gold_reward"].idxmax()]
    above = "above" if best.gold_reward_ci_low > sft.gold_reward_ci_high else "not clearly above"
    ties = int((trained["gold_reward"] == best.gold_reward).sum()) - 1
    tied = f" (tied with {ties} other run{'s' if ties > 1 else ''})" if ties else ""
    out.append(f"Highest gold reward{tied}: {best.run} ({best.method}) at {best.gold_reward:.3f} "
               f"(CI {best.gold_reward_ci_low:.3f} to {best.gold_reward_ci_high:.3f}, exact KL {best.kl_exact:.2f} nats), "
               f"{above} the SFT policy's interval.")
    for method, group in trained.groupby("method"):
        top = group.loc[group["gold_reward"].idxmax()]
        out.append(f"{method}: best run {top.run}, gold {top.gold_reward:.3f} at exact KL {top.kl_exact:.2f}; "
                   f"{len(group)} run(s) spanning exact KL {group.kl_exact.min():.2f} to {group.kl_exact.max():.2f}.")
    differences = tables.get("differences", pd.DataFrame())
    # the head-to-head row only: best DPO vs best PPO (not the Best-of-N rows, which name other runs)
    method_of = dict(zip(runs["run"], runs["method"]))
    head = differences[[method_of.get(a) == "DPO" and method_of.get(b) == "PPO"
                        for a, b in zip(differences.get("a", []), differences.get("b", []))]]
    for row in head.itertuples():
        verdict = ("significant at 95%, so " + ("DPO" if row.diff > 0 else "PPO") + " is ahead"
                   if significant(row.ci_low, row.ci_high) else "not significant at 95%: no winner")
        out.append(f"Best DPO minus best PPO ({row.a} − {row.b}): {row.diff:+.3f} gold reward, paired 95% CI "
                   f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}], {verdict}.")
    out.extend(leader_sentences(runs, differences))
    out.extend(difference_sentences(differences))
    wins = tables["win_rates"]
    hot = wins[(wins.method != "SFT")]
    if not hot.empty:
        t_best = hot.loc[hot["win_rate"].idxmax()]
        out.append(f"Highest win rate against SFT: {t_best.run} at temperature {t_best.temperature:g}, "
                   f"{t_best.win_rate:.2f} (CI {t_best.win_rate_ci_low:.2f} to {t_best.win_rate_ci_high:.2f}).")
    out.extend(compute_matched_sentences(tables["compute_matched"]))
    if "best_of_n" in tables:
        bon = tables["best_of_n"]
        last = bon.iloc[-1]
        out.append(f"Best-of-{int(last['n'])} with the learned reward: gold {last['gold_reward']:.3f} at KL at most "
                   f"{last['kl_analytic']:.2f} (the analytic upper bound); selecting by the gold reward itself would reach {last['oracle_gold_reward']:.3f}.")
    return out


# -- plots ------------------------------------------------------------------------------------------
def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _methods_scatter(tables: dict, x: str, bon_x: str, xlabel: str, title: str, x_ci: bool) -> str:
    """Every run a point with 95% CI bars, one colour per method; Best-of-N as its own series."""
    runs = tables["runs"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, group in runs.groupby("method"):
        xerr = [group[x] - group[f"{x}_ci_low"], group[f"{x}_ci_high"] - group[x]] if x_ci else None
        ax.errorbar(group[x], group["gold_reward"], xerr=xerr,
                    yerr=[group["gold_reward"] - group["gold_reward_ci_low"], group["gold_reward_ci_high"] - group["gold_reward"]],
                    fmt="o", capsize=3, color=METHOD_COLORS.get(method), label=method)
    if "best_of_n" in tables:
        bon = tables["best_of_n"]
        ax.plot(bon[bon_x], bon["gold_reward"], "s--", color=METHOD_COLORS["Best-of-N"], label="Best-of-N")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("gold reward (95% CI)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _figure_png(fig)


def plot_frontier(tables: dict) -> str:
    return _methods_scatter(tables, "kl_exact", "kl_analytic",
                            "KL(π ‖ π_SFT), nats (exact, 95% CI; Best-of-N: analytic upper bound)",
                            "Reward–KL frontier", x_ci=True)


def plot_win_rates(tables: dict) -> str:
    wins = tables["win_rates"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run, group in wins.groupby("run"):
        method = group["method"].iloc[0]
        if method == "SFT":
            continue
        ax.errorbar(group["temperature"], group["win_rate"],
                    yerr=[group["win_rate"] - group["win_rate_ci_low"], group["win_rate_ci_high"] - group["win_rate"]],
                    marker="o", capsize=2, color=METHOD_COLORS.get(method), label=run, alpha=0.85)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate vs SFT (gold judge)")
    ax.set_title("Win rate against the SFT policy")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _figure_png(fig)


def plot_reward_vs_compute(tables: dict) -> str:
    return _methods_scatter(tables, "total_cpu_s", "total_cpu_s",
                            "compute spent, CPU-seconds (incl. reward model, preference data, reference)",
                            "Reward vs compute", x_ci=False)


def plot_best_of_n(tables: dict) -> str | None:
    if "best_of_n" not in tables:
        return None
    bon = tables["best_of_n"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(bon["n"], bon["gold_reward"], "o-", color=METHOD_COLORS["Best-of-N"], label="selected by learned reward")
    ax.plot(bon["n"], bon["oracle_gold_reward"], "o--", color="black", label="selected by gold (oracle)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N")
    ax.set_ylabel("gold reward")
    ax.set_title("Best-of-N vs N")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _figure_png(fig)


# -- HTML -------------------------------------------------------------------------------------------
def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="t")


def write_report(root: Path, config, policies, evaluations, stages, best_of_n, *, reward_model: dict | None = None,
                 best_of_n_differences: pd.DataFrame | None = None) -> Path:
    tables = build_tables(config, policies, evaluations, stages, best_of_n, best_of_n_differences)
    table_dir = root / "tables"
    table_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_csv(table_dir / f"{name}.csv", index=False)
        frame.to_parquet(table_dir / f"{name}.parquet", index=False)
    plots = {"Reward–KL frontier": plot_frontier(tables), "Win rate vs temperature": plot_win_rates(tables),
             "Reward vs compute": plot_reward_vs_compute(tables), "Best-of-N vs N": plot_best_of_n(tables)}
    sentences = summary_sentences(tables)
    if reward_model is not None:
        (table_dir / "reward_model.json").write_text(json.dumps(reward_model, indent=2, default=float))
        sentences += reward_model_sentences(reward_model, best_of_n_differences)
    columns = ["run", "method", "param", "step", "gold_reward", "gold_reward_ci_low", "gold_reward_ci_high", "kl_exact",
               "kl_exact_ci_low", "kl_exact_ci_high", "kl", "kl_ci_low", "kl_ci_high", "samples", "total_wall_s", "total_cpu_s", "total_tokens_generated", "total_tokens_trained"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>rayalign comparison</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table.t{border-collapse:collapse;font-size:12px}table.t td,table.t th{padding:3px 8px;border-bottom:1px solid #ddd}"
        "img{max-width:100%}.plots{display:grid;grid-template-columns:1fr 1fr;gap:12px}</style></head><body>",
        f"<h1>RLHF (PPO) vs DPO: {html.escape(config.run_name)}</h1>",
        f"<p>Model <code>{html.escape(str(config.model))}</code>, gold reward <code>{html.escape(config.gold_scorer)}</code>, "
        f"{int(tables['runs']['samples'].iloc[0])} held-out samples per policy at temperature {config.eval.kl_temperature:g}, "
        f"seed {config.seed}.</p>",
        "<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul>",
        "<h2>Plots</h2><div class='plots'>" + "".join(
            f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'><figcaption>{html.escape(title)}"
            "</figcaption></figure>" for title, png in plots.items() if png) + "</div>",
        "<h2>Runs</h2>" + _table_html(tables["runs"][columns]),
        "<h2>Compute-matched</h2>" + _table_html(tables["compute_matched"]),
        "<h2>Win rates against SFT</h2>" + _table_html(tables["win_rates"]),
    ]
    parts.append("<h2>Paired differences (gold reward, prompt-level bootstrap)</h2>" + _table_html(tables["differences"]))
    if reward_model is not None:
        parts.append("<h2>Reward model</h2>" + _table_html(pd.DataFrame([reward_model])))
    if "best_of_n" in tables:
        parts.append("<h2>Best-of-N</h2>" + _table_html(tables["best_of_n"]))
    parts.append("<h2>Example continuations</h2>" + _table_html(tables["examples"]))
    parts.append("<h2>Stages</h2>" + _table_html(tables["stages"]))
    parts.append(f"<p>Tables: <code>{html.escape(str(table_dir))}</code> (CSV and Parquet). Samples of every policy: "
                 "<code>stages/eval-*/samples.parquet</code>.</p></body></html>")
    path = root / "report.html"
    path.write_text("\n".join(parts))
    (root / "summary.txt").write_text("\n".join(sentences) + "\n")
    return path
