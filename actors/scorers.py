"""Gold / programmatic reward functions that need no training.

Each scorer maps (prompt text, response text, response token ids) to one float per sample and is
deterministic. Selected by a spec string:
- ``vader``: VADER sentiment compound score of prompt + response, in [-1, 1] (the controlled-sentiment
  task's gold reward when no Hub classifier is reachable);
- ``hf-classifier:<model id or folder>[@<label>]``: probability of ``label`` (default: the label
  whose name contains "pos") from a Hugging Face sequence classifier, e.g.
  ``hf-classifier:siebert/sentiment-roberta-large-english`` on GPU clusters;
- ``hf-reward:<model id or folder>``: the single logit of a sequence-classification reward model
  fed (prompt, response) as a text pair, e.g. ``hf-reward:OpenAssistant/reward-model-deberta-v3-large-v2``
  as the judge for HH / TL;DR comparisons on GPU clusters;
- ``token-frequency:<id>`` or ``token-frequency:<lo>-<hi>``: fraction of response tokens equal to the
  id, or inside the inclusive id range (a reward whose optimum is known; a range gives a random
  model a dense signal, which the PPO tests use).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch


class Scorer(Protocol):
    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 response_ids: Sequence[Sequence[int]]) -> list[float]: ...


class VaderScorer:
    def __init__(self, include_prompt: bool = True):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.include_prompt = include_prompt

    def __call__(self, prompts, responses, response_ids):
        texts = [(p + r) if self.include_prompt else r for p, r in zip(prompts, responses)]
        return [float(self.analyzer.polarity_scores(t)["compound"]) for t in texts]


class HFClassifierScorer:
    def __init__(self, model_id: str, label: str | None = None, device: str = "cpu", batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_id).to(device).eval()
        labels = {name.lower(): int(i) for i, name in self.model.config.id2label.items()}
        if label is None:
            matches = [i for name, i in labels.items() if "pos" in name]
            if not matches:
                raise ValueError(f"classifier {model_id} has labels {sorted(labels)}; name one with @<label>")
            self.label_index = matches[0]
        else:
            if label.lower() not in labels:
                raise ValueError(f"classifier {model_id} has no label {label!r} (labels: {sorted(labels)})")
            self.label_index = labels[label.lower()]
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, prompts, responses, response_ids):
        texts = [p + r for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True, return_tensors="pt").to(self.device)
            probs = self.model(**enc).logits.float().softmax(-1)[:, self.label_index]
            scores.extend(probs.tolist())
        return scores


class HFRewardModelScorer:
    """A reward model with one output logit (OpenAssistant / Skywork style), scoring (prompt, response) pairs."""

    def __init__(self, model_id: str, device: str | None = None, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model_id).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"hf-reward:{model_id} has {self.model.config.num_labels} labels; a reward model has 1 "
                             "(use hf-classifier:<id>@<label> for classifiers)")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, prompts, responses, response_ids):
        scores: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(list(prompts[i:i + self.batch_size]), list(responses[i:i + self.batch_size]),
                                 padding=True, truncation=True, return_tensors="pt").to(self.device)
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


class TokenFrequencyScorer:
    def __init__(self, low: int, high: int | None = None):
        self.low, self.high = int(low), int(low if high is None else high)

    def __call__(self, prompts, responses, response_ids):
        return [sum(self.low <= t <= self.high for t in ids) / max(1, len(ids)) for ids in response_ids]


def build_scorer(spec: str) -> Scorer:
    kind, _, arg = spec.partition(":")
    if kind == "vader":
        return VaderScorer(include_prompt=(arg != "response-only"))
    if kind == "hf-classifier":
        if not arg:
            raise ValueError("scorer 'hf-classifier' needs a model: hf-classifier:<model id>[@<label>]")
        model_id, _, label = arg.partition("@")
        return HFClassifierScorer(model_id, label or None)
    if kind == "hf-reward":
        if not arg:
            raise ValueError("scorer 'hf-reward' needs a model: hf-reward:<model id or folder>")
        return HFRewardModelScorer(arg)
    if kind == "token-frequency":
        low, _, high = arg.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"scorer 'token-frequency' needs a token id or range: token-frequency:<id>[-<id>], got {spec!r}")
        return TokenFrequencyScorer(int(low), int(high) if high else None)
    raise ValueError(f"unknown scorer {spec!r} (vader, hf-classifier:<id>, hf-reward:<id>, token-frequency:<id>)")
