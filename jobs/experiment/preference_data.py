"""A preference dataset made by sampling a policy and labelling every pair with a gold scorer.

The DPO paper's controlled-sentiment protocol: k samples per prompt from the SFT policy, all
k·(k−1)/2 pairs per prompt, the higher gold score is ``chosen``; ties are dropped. ``pairing:
best_vs_worst`` keeps one pair per prompt instead, its best and worst sample by gold score: the
cleanest label a prompt offers (the largest gap), at the price of fewer pairs. Written as JSONL
in the shared data layer's generic layout (prompt, chosen, rejected, scores), so every job reads it
with ``data.train=jsonl:<path>``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from actors.generation import GenerationActor, generate_sharded
from actors.sampling import SamplingConfig
from actors.group import ActorGroup, ActorResources
from actors.models import load_tokenizer
from actors.reward import RewardModelActor


PAIRINGS = ("all", "best_vs_worst")


@dataclass
class PreferenceDataConfig:
    samples_per_prompt: int = 4
    num_prompts: int = 64
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=32))
    min_gap: float = 0.0           # drop pairs whose gold scores differ by no more than this
    pairing: str = "all"           # all: every pair of a prompt's samples | best_vs_worst: one pair per prompt
    # The generator's threads (it works alone in this stage, so it can use every core); None: the comparison's
    torch_threads: int | None = None

    def validate(self, prefix: str = "preference") -> None:
        if self.pairing not in PAIRINGS:
            raise ValueError(f"{prefix}.pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"{prefix}.samples_per_prompt must be >= 2 to form pairs, got {self.samples_per_prompt}")
        if self.num_prompts < 1:
            raise ValueError(f"{prefix}.num_prompts must be >= 1, got {self.num_prompts}")
        self.sampling.validate(f"{prefix}.sampling")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"{prefix}.torch_threads must be >= 1, got {self.torch_threads}")


def label_pairs(prompt: str, responses: list[str], scores: list[float], min_gap: float = 0.0,
                pairing: str = "all") -> list[dict]:
    """Every pair of distinct samples (``all``), or only the best and the worst sample (``best_vs_worst``;
    the first of tied samples); the higher-scored one chosen; pairs within ``min_gap`` dropped."""
    rows = []
    candidates = itertools.combinations(range(len(responses)), 2)
    if pairing == "best_vs_worst":
        usable = [k for k, r in enumerate(responses) if r.strip()]
        if len(usable) < 2:
            return []
        best = max(usable, key=lambda k: (scores[k], -k))
        worst = min(usable, key=lambda k: (scores[k], k))
        candidates = [(min(best, worst), max(best, worst))] if best != worst else []
    for i, j in candidates:
        if abs(scores[i] - scores[j]) <= min_gap or responses[i] == responses[j]:
            continue
        if not responses[i].strip() or not responses[j].strip():  # an immediate EOS: nothing to prefer
            continue
        win, lose = (i, j) if scores[i] > scores[j] else (j, i)
        rows.append({"prompt": prompt, "chosen": responses[win], "rejected": responses[lose],
                     "chosen_score": scores[win], "rejected_score": scores[lose]})
    return rows


def build_preference_data(policy: str, prompts: list[str], gold_scorer: str, config: PreferenceDataConfig,
                          out_path: str | Path, *, seed: int = 0, num_generators: int = 1,
                          torch_threads: int | None = None, backend: str = "hf") -> dict:
    """Sample ``policy`` on ``prompts``, label pairs with ``gold_scorer``, write JSONL; returns a summary."""
    tokenizer = load_tokenizer(policy)
    prompts = prompts[: config.num_prompts]
    prompt_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    resources = ActorResources(torch_threads=torch_threads)
    generators = ActorGroup(GenerationActor, "generator", num_actors=num_generators, indexed_names=True,
                            resources=resources, init_kwargs={"model": policy, "seed": seed, "backend": backend})
    judge = ActorGroup(RewardModelActor, "judge", resources=resources,
                       init_kwargs={"kind": "gold", "scorer": gold_scorer, "tokenizer": policy})
    try:
        generators.wait_ready()
        sampling = dataclasses.replace(config.sampling, n=config.samples_per_prompt, seed=seed)
        completions = generate_sharded(generators, prompt_ids, sampling)
        scores = judge.run_one("score", [c.prompt_ids for c in completions],
                               [c.response_ids for c in completions])["scores"].tolist()
    finally:
        generators.shutdown()
        judge.shutdown()
    by_prompt: dict[int, list[tuple[str, float]]] = {}
    for c, s in zip(completions, scores):
        text = tokenizer.decode(c.response_ids, skip_special_tokens=True)
        by_prompt.setdefault(c.prompt_index, []).append((text, s))
    rows = []
    for index, samples in sorted(by_prompt.items()):
        rows.extend(label_pairs(prompts[index], [t for t, _ in samples], [s for _, s in samples], config.min_gap,
                                config.pairing))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return {"pairs": len(rows), "prompts": len(prompts), "samples": len(completions),
            "tokens_generated": sum(len(c.response_ids) for c in completions),
            "gold_mean_of_samples": sum(scores) / len(scores), "path": str(out_path)}
