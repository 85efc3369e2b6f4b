"""Best-of-N: sample N responses per prompt, keep the one the reward model scores highest, and report
its gold reward against N next to the analytic KL of Best-of-N, log N − (N−1)/N.

    python -m jobs.best_of_n --preset best_of_n_smollm2_vader [key.sub=value ...]

One pool of ``max_n`` samples per held-out prompt is generated across the generator group and scored
once by the reward model (the selector) and once by the gold scorer. The value at each
N in {1, 2, 4, ..., max_n} is the exact average over every N-subset of the pool (an unbiased estimate,
see ``actors.math.best_of_n.expected_best_of_n``), so all N share one set of samples. Two curves:
- ``gold_reward``: gold reward of the sample the reward model picks;
- ``oracle_gold_reward``: gold reward of the sample the gold scorer itself picks (the ceiling).
The gap between them is reward-model over-optimisation. Writes best_of_n.csv, best_of_n.png,
samples.parquet, metrics (step = N), config.yaml and summary.json into the run folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from actors.math.best_of_n import best_of_n_kl, expected_best_of_n, n_values
from actors.generation import GENERATION_BACKENDS, GenerationActor, generate_sharded
from actors.sampling import SamplingConfig
from actors.group import ActorGroup, ActorResources
from actors.models import load_tokenizer
from actors.reward import RewardModelActor
from jobs.run.batching import TokenizeConfig, encode_prompt
from jobs.run.cluster import init_ray
from jobs.run.config import ConfigError, check_model, check_reward_source, check_scorer, run_cli, save_config
from jobs.data.source import DataConfig, load_prompt_splits
from jobs.run.metrics import MetricsLogger
from jobs.experiment.stats import bootstrap_ci


@dataclass
class SelectorConfig:
    kind: str = "gold"             # gold (a scorer spec) | learned (a reward-model folder from jobs.drivers.reward)
    scorer: str | None = "vader"   # for kind=gold: see actors.scorers
    model: str | None = None       # for kind=learned


@dataclass
class BestOfNConfig:
    run_name: str = "best_of_n"
    output_dir: str = "runs"
    seed: int = 0
    model: str = "smollm2"
    data: DataConfig = field(default_factory=lambda: DataConfig(train="demo", eval_fraction=0.2))
    split: str = "eval"                # which prompts: the held-out split (as evaluation uses) or train
    num_prompts: int = 32
    tokenize: TokenizeConfig = field(default_factory=lambda: TokenizeConfig(max_prompt_length=64, max_length=128))
    max_n: int = 16                    # pool size per prompt; N runs over 1, 2, 4, ..., max_n
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reward: SelectorConfig = field(default_factory=SelectorConfig)  # picks the best of N
    gold_scorer: str = "vader"         # judges the pick
    num_generators: int = 1
    backend: str = "auto"              # hf | vllm | auto (vLLM where installed and able to host the model)
    backend_options: dict[str, Any] = field(default_factory=dict)  # vLLM options (actors.vllm_backend)
    shard_retries: int = 1             # re-run a lost generator's shard on a surviving generator
    ci_resamples: int = 2000
    torch_threads: int | None = None
    address: str | None = None

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(n=self.max_n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, seed=self.seed)

    def validate(self) -> None:
        self.data.validate()
        self.tokenize.validate()
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (Best-of-N needs distinct samples), got {self.temperature}")
        self.sampling().validate("sampling")
        for key in ("num_prompts", "max_n", "num_generators", "ci_resamples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.shard_retries < 0:
            raise ConfigError(f"shard_retries must be >= 0, got {self.shard_retries}")
        if self.split not in ("eval", "train"):
            raise ConfigError(f"split must be eval or train, got {self.split!r}")
        if self.backend not in GENERATION_BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(GENERATION_BACKENDS)}, got {self.backend!r}")
        if self.backend == "hf" and self.backend_options:
            raise ConfigError("backend_options apply to the vllm backend only (backend is hf)")
        check_reward_source("reward", self.reward)
        if not self.gold_scorer:
            raise ConfigError("gold_scorer is required")
        check_model("model", self.model)
        check_scorer("gold_scorer", self.gold_scorer)


def best_of_n_table(selector: np.ndarray, gold: np.ndarray, max_n: int, *, seed: int = 0,
                    resamples: int = 2000) -> pd.DataFrame:
    """One row per N from [prompts, max_n] score arrays: means over prompts with 95% bootstrap CIs."""
    rows = []
    for n in n_values(max_n):
        picked = np.array([expected_best_of_n(s, g, n) for s, g in zip(selector, gold)])
        oracle = np.array([expected_best_of_n(g, g, n) for g in gold])
        proxy = np.array([expected_best_of_n(s, s, n) for s in selector])
        low, high = bootstrap_ci(picked, resamples=resamples, seed=seed)
        o_low, o_high = bootstrap_ci(oracle, resamples=resamples, seed=seed)
        rows.append({"n": n, "kl_analytic": best_of_n_kl(n),
                     "gold_reward": float(picked.mean()), "gold_reward_ci_low": low, "gold_reward_ci_high": high,
                     "oracle_gold_reward": float(oracle.mean()), "oracle_ci_low": o_low, "oracle_ci_high": o_high,
                     "reward_model_score": float(proxy.mean())})
    return pd.DataFrame(rows)


def plot_best_of_n(table: pd.DataFrame, path: Path, selector_name: str, gold_name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, label in ((axes[0], table["n"], "N"), (axes[1], table["kl_analytic"], "KL(best-of-N || base), nats")):
        ax.plot(x, table["gold_reward"], "o-", label=f"picked by {selector_name}")
        ax.fill_between(x, table["gold_reward_ci_low"], table["gold_reward_ci_high"], alpha=0.2)
        ax.plot(x, table["oracle_gold_reward"], "s--", color="black", label=f"picked by {gold_name} (oracle)")
        ax.fill_between(x, table["oracle_ci_low"], table["oracle_ci_high"], color="black", alpha=0.1)
        ax.set_xlabel(label)
        ax.set_ylabel(f"gold reward ({gold_name})")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[0].set_title("Best-of-N: gold reward vs N")
    axes[1].set_title("Best-of-N: gold reward vs analytic KL")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _selector_name(config: BestOfNConfig) -> str:
    return f"reward model ({Path(config.reward.model).name})" if config.reward.kind == "learned" else config.reward.scorer


def train(config: BestOfNConfig) -> dict:
    out = Path(config.output_dir) / config.run_name
    tokenizer = load_tokenizer(config.model)
    train_prompts, eval_prompts, report = load_prompt_splits(config.data, config.seed)
    records = (eval_prompts if config.split == "eval" else train_prompts)[: config.num_prompts]
    if not records:
        raise ConfigError(f"no prompts in the {config.split} split of {config.data.train!r}")
    prompt_ids = [encode_prompt(tokenizer, r.prompt, config.tokenize)[-config.tokenize.max_prompt_length:]
                  for r in records]
    print(f"[data] {len(prompt_ids)} {config.split} prompts x {config.max_n} samples; {json.dumps(report)}")

    save_config(config, out)  # the first write, once config and data are checked: a failed start writes nothing
    init_ray(config.address, namespace=f"rayalign-{config.run_name}")
    threads = config.torch_threads or max(1, (os.cpu_count() or 1) // config.num_generators)
    generators = ActorGroup(GenerationActor, "generator", num_actors=config.num_generators, indexed_names=True,
                            resources=ActorResources(torch_threads=threads), init_kwargs={
                                "model": config.model, "backend": config.backend, "seed": config.seed,
                                "backend_options": config.backend_options})
    scorer_resources = ActorResources(num_cpus=0.5, torch_threads=config.torch_threads or 1)
    judge = ActorGroup(RewardModelActor, "gold", resources=scorer_resources,
                       init_kwargs={"kind": "gold", "scorer": config.gold_scorer, "tokenizer": config.model})
    same_as_gold = config.reward.kind == "gold" and config.reward.scorer == config.gold_scorer
    selector = judge if same_as_gold else ActorGroup(
        RewardModelActor, "reward", resources=scorer_resources,
        init_kwargs={"kind": config.reward.kind, "scorer": config.reward.scorer, "model": config.reward.model,
                     "tokenizer": config.model, "seed": config.seed})
    groups = [generators, judge] + ([] if same_as_gold else [selector])
    try:
        for info in generators.wait_ready():
            print(f"[ready] {info['role']} pid={info['pid']} backend={info['backend']} threads={info['torch_threads']}")
        for group in groups[1:]:
            group.wait_ready()

        start = time.perf_counter()
        completions = generate_sharded(generators, prompt_ids, config.sampling(), retries=config.shard_retries)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        prompts_of = [c.prompt_ids for c in completions]
        responses = [c.response_ids for c in completions]
        gold_ref = judge.submit("score", prompts_of, responses)
        selector_ref = gold_ref if same_as_gold else selector.submit("score", prompts_of, responses)
        gold_scores, selector_scores = judge.get([gold_ref, selector_ref], "score")
        score_s = time.perf_counter() - start
    finally:
        for group in groups:
            if group is generators:
                try:
                    group.run_all("close", timeout_s=120)
                except Exception as exc:  # a dead generator has nothing left to close
                    print(f"[warn] closing generators: {exc}")
            group.shutdown()

    shape = (len(prompt_ids), config.max_n)
    gold = gold_scores["scores"].numpy().reshape(shape)
    picked_by = selector_scores["scores"].numpy().reshape(shape)
    table = best_of_n_table(picked_by, gold, config.max_n, seed=config.seed, resamples=config.ci_resamples)
    lengths = np.array([len(r) for r in responses], dtype=float)
    table["tokens_per_prompt"] = table["n"] * lengths.mean()
    csv_path = out / "best_of_n.csv"
    table.to_csv(csv_path, index=False)
    plot_path = plot_best_of_n(table, out / "best_of_n.png", _selector_name(config), config.gold_scorer)
    pd.DataFrame({
        "prompt_index": [c.prompt_index for c in completions], "sample_index": [c.sample_index for c in completions],
        "prompt": tokenizer.batch_decode(prompts_of, skip_special_tokens=True),
        "response": tokenizer.batch_decode(responses, skip_special_tokens=True),
        "response_length": lengths.astype(int), "finish_reason": [c.finish_reason for c in completions],
        "reward_model_score": picked_by.reshape(-1), "gold_score": gold.reshape(-1),
    }).to_parquet(out / "samples.parquet", index=False)
    logger = MetricsLogger(out)
    for row in table.to_dict("records"):
        logger.log(int(row["n"]), {f"best_of_n/{k}": v for k, v in row.items() if k != "n"})
    logger.close()

    tokens = int(lengths.sum())
    summary = {"csv": str(csv_path), "plot": str(plot_path), "prompts": len(prompt_ids), "max_n": config.max_n,
               "selector": _selector_name(config), "gold_scorer": config.gold_scorer,
               "estimator": "mean over all N-subsets of the max_n pool (unbiased)",
               "tokens_generated": tokens, "timing_s": {"generate": generate_s, "score": score_s},
               "tokens_per_s": tokens / generate_s, "table": table.to_dict("records")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(table[["n", "kl_analytic", "gold_reward", "oracle_gold_reward", "reward_model_score"]]
          .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"[done] {csv_path} and {plot_path}; {tokens} tokens in {generate_s:.1f} s on "
          f"{config.num_generators} generator(s)")
    return summary


def _flags_to_overrides(argv: list[str]) -> list[str]:
    """``--num-generators N`` / ``--max-n N`` / ``--backend B`` as shorthands for their overrides."""
    flags = {"--num-generators": "num_generators", "--max-n": "max_n", "--backend": "backend"}
    out, i = [], 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag in flags:
            if not value:
                if i + 1 >= len(argv):
                    raise SystemExit(f"{flag} needs a value")
                value, i = argv[i + 1], i + 1
            out.append(f"{flags[flag]}={value}")
        else:
            out.append(argv[i])
        i += 1
    return out


def main(argv=None) -> int:
    argv = _flags_to_overrides(list(sys.argv[1:] if argv is None else argv))
    return run_cli(BestOfNConfig, train, "python -m jobs.best_of_n", __doc__, argv,
                   "key.sub=value overrides, e.g. max_n=64 (shorthands: --num-generators, --max-n, --backend)")


if __name__ == "__main__":
    raise SystemExit(main())
