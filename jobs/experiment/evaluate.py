"""Evaluating a trained policy on held-out prompts: gold reward, KL to the reference, win rate vs a baseline.

For each sampling temperature the policy (and, once, the baseline) samples continuations that the
gold scorer judges. At the KL temperature (1.0: the policy's own distribution) the sequence KL to the
reference is computed exactly (Σ over response positions of KL between the two models' full
next-token distributions, both at the sampling temperature) beside the sampled estimate
mean[log π(y|x) − log π_ref(y|x)], all from one actor holding both models. Every sample is kept
(Parquet) so any number in a report can be recomputed from it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from actors.math.batch import collate_sequences
from actors.generation import GenerationActor, generate_sharded
from actors.kl_scorer import KLScorerActor
from actors.sampling import SamplingConfig
from actors.group import ActorGroup, ActorResources
from actors.models import load_tokenizer
from actors.reward import RewardModelActor
from jobs.experiment.stats import prompt_bootstrap


@dataclass
class EvalConfig:
    num_prompts: int = 32
    samples_per_prompt: int = 2          # greedy (temperature 0) always takes one
    max_new_tokens: int = 32
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    kl_temperature: float = 1.0
    generation_options: dict = field(default_factory=dict)  # the evaluator's vLLM options (e.g. kv_cache_gib)
    # Threads of the evaluator's generator and KL scorer, which work one after the other (so each can use
    # every core); None: the comparison's torch_threads
    torch_threads: int | None = None

    def validate(self, prefix: str = "eval") -> None:
        if self.num_prompts < 1 or self.samples_per_prompt < 1 or self.max_new_tokens < 1:
            raise ValueError(f"{prefix}: num_prompts, samples_per_prompt and max_new_tokens must be >= 1")
        if self.kl_temperature not in self.temperatures:
            raise ValueError(f"{prefix}.kl_temperature ({self.kl_temperature}) must be one of {prefix}.temperatures")
        if any(t < 0 for t in self.temperatures):
            raise ValueError(f"{prefix}.temperatures must be >= 0, got {self.temperatures}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"{prefix}.torch_threads must be >= 1, got {self.torch_threads}")


def policy_seed(base: int, run: str) -> int:
    """The evaluation sampling seed of one policy: derived from the experiment's seed and the run's
    name, so it is stable across reruns (crc32, not Python's salted hash) and differs between policies.
    With one seed for all, every policy drew the same random numbers and win rates compared coupled
    samples (SFT vs SFT came out exactly 0.5 [0.5, 0.5]; issue 17 defect f)."""
    return (base * 1_000_003 + zlib.crc32(run.encode("utf-8"))) % (2**31 - 1)


def gold_judge(scorer: str, tokenizer: str) -> ActorGroup:
    return ActorGroup(RewardModelActor, "judge", resources=ActorResources(torch_threads=1),
                      init_kwargs={"kind": "gold", "scorer": scorer, "tokenizer": tokenizer})


def win_rates(samples: pd.DataFrame, baseline: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per temperature: the fraction of (prompt, sample) slots where the policy's gold score beats the
    baseline's on the same prompt and sample index (ties count one half), as a mean over prompts with a
    prompt-level bootstrap CI (a prompt's comparisons move together, as its samples do)."""
    keys = ["temperature", "prompt_index", "sample_index"]
    merged = samples[keys + ["gold"]].merge(baseline[keys + ["gold"]], on=keys, suffixes=("", "_baseline"))
    rows = []
    for temperature, group in merged.groupby("temperature"):
        outcome = group.assign(win=np.where(group["gold"] > group["gold_baseline"], 1.0,
                                            np.where(group["gold"] == group["gold_baseline"], 0.5, 0.0)))
        rate, low, high = prompt_bootstrap(outcome, "win", seed=seed)
        rows.append({"temperature": float(temperature), "win_rate": rate, "win_rate_ci_low": low,
                     "win_rate_ci_high": high, "comparisons": len(outcome), "prompts": int(outcome["prompt_index"].nunique())})
    return pd.DataFrame(rows)


def summarize(samples: pd.DataFrame, config: EvalConfig, seed: int = 0) -> dict:
    """At the KL temperature: gold reward, sampled KL (k1) and exact KL, each a mean over prompts with a
    prompt-level bootstrap CI (a prompt's samples move together)."""
    at = samples[samples["temperature"] == config.kl_temperature].assign(
        kl=lambda f: f["logp_policy"] - f["logp_reference"])
    out = {}
    for name, column in (("gold_reward", "gold"), ("kl", "kl"), ("kl_exact", "kl_exact")):
        mean, low, high = prompt_bootstrap(at, column, seed=seed)
        out.update({name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high})
    return {**out, "samples": int(len(at)), "prompts": int(at["prompt_index"].nunique()),
            "response_length": float(at["response_ids"].map(len).mean())}


def score_kl(samples: pd.DataFrame, scorer: ActorGroup, temperature: float, *, pad_id: int,
             chunk: int = 64) -> None:
    """Fill logp_policy, logp_reference and kl_exact for every row, at the sampling ``temperature``."""
    values = {"logp_policy": [], "logp_reference": [], "kl_exact": []}
    for start in range(0, len(samples), chunk):
        part = samples.iloc[start:start + chunk]
        batch = collate_sequences(list(part["prompt_ids"]), list(part["response_ids"]), pad_id)
        out = scorer.run_one("score", batch, temperature)
        for name in values:
            values[name].extend(out[name].tolist())
    for name, column in values.items():
        samples[name] = column


class PolicyEvaluator:
    """One generation worker and one KL scorer for every policy of an evaluation stage.

    Both start once with the reference (SFT) policy; each evaluated policy's saved weights are then
    loaded in place (``load_model_folder`` / ``load_policy``) instead of starting a new engine and a
    new scorer per policy. Sampling is seeded per request, so a policy's samples do not depend on
    which policies were evaluated before it.
    """

    def __init__(self, reference: str, config: EvalConfig, judge: ActorGroup, *, torch_threads: int | None = None,
                 backend: str = "hf", generation_options: dict | None = None):
        self.reference, self.config, self.judge = reference, config, judge
        self.tokenizer = load_tokenizer(reference)
        resources = ActorResources(torch_threads=torch_threads)
        self.generators = ActorGroup(GenerationActor, "generator", resources=resources, indexed_names=True,
                                     init_kwargs={"model": reference, "seed": 0, "backend": backend,
                                                  "backend_options": generation_options})
        self.scorer = ActorGroup(KLScorerActor, "kl-scorer", resources=resources,
                                 init_kwargs={"model": reference, "reference": reference})
        self.loaded: str | None = reference

    def _load(self, policy: str) -> None:
        if policy != self.loaded:
            self.generators.get(self.generators.call_all("load_model_folder", policy) +
                                [self.scorer.submit("load_policy", policy)], "load_model_folder")
            self.loaded = policy

    def sample_and_score(self, policy: str, prompt_ids: list[list[int]], *, seed: int) -> pd.DataFrame:
        """One row per sample at every temperature: ids, text, gold score."""
        self._load(policy)
        rows = []
        for temperature in self.config.temperatures:
            n = 1 if temperature == 0 else self.config.samples_per_prompt
            sampling = SamplingConfig(n=n, temperature=temperature, max_new_tokens=self.config.max_new_tokens,
                                      seed=seed + int(temperature * 1000))
            completions = generate_sharded(self.generators, prompt_ids, sampling)
            scores = self.judge.run_one("score", [c.prompt_ids for c in completions],
                                        [c.response_ids for c in completions])["scores"].tolist()
            for c, score in zip(completions, scores):
                rows.append({"temperature": temperature, "prompt_index": c.prompt_index,
                             "sample_index": c.sample_index,
                             "prompt": self.tokenizer.decode(c.prompt_ids, skip_special_tokens=True),
                             "response": self.tokenizer.decode(c.response_ids, skip_special_tokens=True),
                             "prompt_ids": list(c.prompt_ids), "response_ids": list(c.response_ids),
                             "finish_reason": c.finish_reason, "gold": float(score)})
        return pd.DataFrame(rows)

    def evaluate(self, policy: str, prompt_ids: list[list[int]], *, seed: int = 0) -> pd.DataFrame:
        """All samples of ``policy`` with gold scores, and at the KL temperature the policy / reference
        log-probs and the exact KL, all at that temperature."""
        samples = self.sample_and_score(policy, prompt_ids, seed=seed)
        at_kl = samples["temperature"] == self.config.kl_temperature
        kl_rows = samples[at_kl].reset_index(drop=True)
        score_kl(kl_rows, self.scorer, self.config.kl_temperature, pad_id=self.tokenizer.pad_token_id)
        for name in ("logp_policy", "logp_reference", "kl_exact"):
            samples[name] = np.nan
            samples.loc[at_kl, name] = kl_rows[name].to_numpy()
        return samples

    def shutdown(self) -> None:
        try:
            self.generators.run_all("close", timeout_s=120)
        except Exception as exc:  # a dead generator has nothing left to close
            print(f"[warn] closing generators: {exc}")
        self.generators.shutdown()
        self.scorer.shutdown()
