"""Evaluating a trained policy on held-out prompts: gold reward, KL to the reference, win rate vs a baseline.

For each sampling temperature the policy (and, once, the baseline) samples continuations that the
gold scorer judges. At the KL temperature (1.0: the policy's own distribution) the sequence KL to the
reference is estimated from the same samples as mean[log π(y|x) − log π_ref(y|x)], with both
log-probs recomputed by the trainer's function. Every sample is kept (Parquet) so any number in a
report can be recomputed from it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from actors.math.batch import collate_sequences
from actors.generation import GenerationActor, generate_sharded
from actors.sampling import SamplingConfig
from actors.group import ActorGroup, ActorResources
from actors.models import load_tokenizer
from actors.reference import ReferenceActor
from actors.reward import RewardModelActor
from jobs.experiment.stats import bootstrap_ci


@dataclass
class EvalConfig:
    num_prompts: int = 32
    samples_per_prompt: int = 2          # greedy (temperature 0) always takes one
    max_new_tokens: int = 32
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    kl_temperature: float = 1.0

    def validate(self, prefix: str = "eval") -> None:
        if self.num_prompts < 1 or self.samples_per_prompt < 1 or self.max_new_tokens < 1:
            raise ValueError(f"{prefix}: num_prompts, samples_per_prompt and max_new_tokens must be >= 1")
        if self.kl_temperature not in self.temperatures:
            raise ValueError(f"{prefix}.kl_temperature ({self.kl_temperature}) must be one of {prefix}.temperatures")
        if any(t < 0 for t in self.temperatures):
            raise ValueError(f"{prefix}.temperatures must be >= 0, got {self.temperatures}")


def policy_seed(base: int, run: str) -> int:
    """The evaluation sampling seed of one policy: derived from the experiment's seed and the run's
    name, so it is stable across reruns (crc32, not Python's salted hash) and differs between policies.
    With one seed for all, every policy drew the same random numbers and win rates compared coupled
    samples (SFT vs SFT came out exactly 0.5 [0.5, 0.5]; issue 17 defect f)."""
    return (base * 1_000_003 + zlib.crc32(run.encode("utf-8"))) % (2**31 - 1)


def sample_and_score(model: str, prompt_ids: list[list[int]], config: EvalConfig, gold: ActorGroup, *, seed: int,
                     torch_threads: int | None = None, backend: str = "hf") -> pd.DataFrame:
    """One row per sample at every temperature: ids, text, gold score."""
    tokenizer = load_tokenizer(model)
    generators = ActorGroup(GenerationActor, "generator", resources=ActorResources(torch_threads=torch_threads),
                            indexed_names=True, init_kwargs={"model": model, "seed": seed, "backend": backend})
    rows = []
    try:
        for temperature in config.temperatures:
            n = 1 if temperature == 0 else config.samples_per_prompt
            sampling = SamplingConfig(n=n, temperature=temperature, max_new_tokens=config.max_new_tokens,
                                      seed=seed + int(temperature * 1000))
            completions = generate_sharded(generators, prompt_ids, sampling)
            scores = gold.run_one("score", [c.prompt_ids for c in completions],
                                  [c.response_ids for c in completions])["scores"].tolist()
            for c, score in zip(completions, scores):
                rows.append({"temperature": temperature, "prompt_index": c.prompt_index, "sample_index": c.sample_index,
                             "prompt": tokenizer.decode(c.prompt_ids, skip_special_tokens=True),
                             "response": tokenizer.decode(c.response_ids, skip_special_tokens=True),
                             "prompt_ids": list(c.prompt_ids), "response_ids": list(c.response_ids),
                             "finish_reason": c.finish_reason, "gold": float(score)})
    finally:
        generators.shutdown()
    return pd.DataFrame(rows)


def add_sequence_logprobs(samples: pd.DataFrame, scorer: ActorGroup, column: str, *, pad_id: int,
                          chunk: int = 64) -> None:
    """Fill ``column`` with log p(response | prompt) for every row, from a model worker (trainer's function)."""
    values = []
    for start in range(0, len(samples), chunk):
        part = samples.iloc[start:start + chunk]
        batch = collate_sequences(list(part["prompt_ids"]), list(part["response_ids"]), pad_id)
        values.extend(scorer.run_one("logprobs", batch)["sum"].tolist())
    samples[column] = values


def logprob_scorer(model: str, name: str, torch_threads: int | None = None) -> ActorGroup:
    return ActorGroup(ReferenceActor, name, resources=ActorResources(torch_threads=torch_threads),
                      init_kwargs={"model": model})


def gold_judge(scorer: str, tokenizer: str) -> ActorGroup:
    return ActorGroup(RewardModelActor, "judge", resources=ActorResources(torch_threads=1),
                      init_kwargs={"kind": "gold", "scorer": scorer, "tokenizer": tokenizer})


def win_rates(samples: pd.DataFrame, baseline: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per temperature: the fraction of (prompt, sample) slots where the policy's gold score beats the
    baseline's on the same prompt and sample index (ties count one half), with a bootstrap CI."""
    keys = ["temperature", "prompt_index", "sample_index"]
    merged = samples[keys + ["gold"]].merge(baseline[keys + ["gold"]], on=keys, suffixes=("", "_baseline"))
    rows = []
    for temperature, group in merged.groupby("temperature"):
        outcome = np.where(group["gold"] > group["gold_baseline"], 1.0,
                           np.where(group["gold"] == group["gold_baseline"], 0.5, 0.0))
        low, high = bootstrap_ci(outcome, seed=seed)
        rows.append({"temperature": float(temperature), "win_rate": float(outcome.mean()), "win_rate_ci_low": low,
                     "win_rate_ci_high": high, "comparisons": len(outcome)})
    return pd.DataFrame(rows)


def summarize(samples: pd.DataFrame, config: EvalConfig, seed: int = 0) -> dict:
    """Gold reward (mean, CI) and sequence KL (mean, CI) at the KL temperature."""
    at = samples[samples["temperature"] == config.kl_temperature]
    gold = at["gold"].to_numpy()
    kl = (at["logp_policy"] - at["logp_reference"]).to_numpy()
    gold_ci, kl_ci = bootstrap_ci(gold, seed=seed), bootstrap_ci(kl, seed=seed)
    return {"gold_reward": float(gold.mean()), "gold_reward_ci_low": gold_ci[0], "gold_reward_ci_high": gold_ci[1],
            "kl": float(kl.mean()), "kl_ci_low": kl_ci[0], "kl_ci_high": kl_ci[1], "samples": int(len(at)),
            "response_length": float(at["response_ids"].map(len).mean())}


def evaluate_policy(model: str, prompt_ids: list[list[int]], config: EvalConfig, *, judge: ActorGroup,
                    reference: ActorGroup, seed: int = 0, torch_threads: int | None = None,
                    backend: str = "hf") -> pd.DataFrame:
    """All samples of one policy with gold scores (``judge``), and policy / reference log-probs at the
    KL temperature (``reference``: a model worker holding the reference policy)."""
    pad_id = load_tokenizer(model).pad_token_id
    samples = sample_and_score(model, prompt_ids, config, judge, seed=seed, torch_threads=torch_threads,
                               backend=backend)
    at_kl = samples["temperature"] == config.kl_temperature
    kl_rows = samples[at_kl].reset_index(drop=True)
    policy = logprob_scorer(model, "policy-logprobs", torch_threads)
    try:
        add_sequence_logprobs(kl_rows, policy, "logp_policy", pad_id=pad_id)
    finally:
        policy.shutdown()
    add_sequence_logprobs(kl_rows, reference, "logp_reference", pad_id=pad_id)
    samples["logp_policy"] = np.nan
    samples["logp_reference"] = np.nan
    samples.loc[at_kl, "logp_policy"] = kl_rows["logp_policy"].to_numpy()
    samples.loc[at_kl, "logp_reference"] = kl_rows["logp_reference"].to_numpy()
    return samples
