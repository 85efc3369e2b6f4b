"""The reward: a learned Bradley-Terry model (LM backbone + scalar head) or a gold scorer."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from actors.batch import collate_sequences, micro_batches
from actors.models import load_tokenizer
from actors.runtime import configure_threads, describe_actor, pick_device, quiet_transformers, seed_everything
from actors.scorers import build_scorer
from actors.value_model import ScalarHeadModel, last_token_index


class RewardModelActor:
    """``kind='learned'``: ``model`` is a causal LM or saved scalar-head folder.
    ``kind='gold'``: ``scorer`` is a spec understood by ``actors.scorers.build_scorer``.

    Both decode with ``tokenizer`` (the policy's), since actors receive token ids.
    """

    role = "reward"

    def __init__(self, *, kind: str = "learned", model: str | None = None, scorer: str | None = None,
                 tokenizer: str | None = None, seed: int = 0, torch_threads: int | None = None,
                 dtype: str = "float32", micro_batch_size: int = 8, normalize: bool = True):
        quiet_transformers()
        configure_threads(torch_threads)
        seed_everything(seed)
        self.kind = kind
        self.device = pick_device()
        self.micro_batch_size = micro_batch_size
        self.normalize = normalize
        if kind == "learned":
            if not model:
                raise ValueError("reward.kind 'learned' needs reward.model")
            self.model = ScalarHeadModel.from_pretrained(model, dtype=dtype).to(self.device).eval()
            self.tokenizer = load_tokenizer(tokenizer or model)
        elif kind == "gold":
            if not scorer:
                raise ValueError("reward.kind 'gold' needs reward.scorer (e.g. vader)")
            self.scorer = build_scorer(scorer)
            self.tokenizer = load_tokenizer(tokenizer or "smollm2")
            self.model = None
        else:
            raise ValueError(f"reward.kind must be 'learned' or 'gold', got {kind!r}")
        self.spec = scorer or model

    def info(self) -> dict:
        return describe_actor(self.role, self.device, kind=self.kind, spec=self.spec)

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """One scalar per (prompt, response): normalised learned reward, or the gold score."""
        start = time.perf_counter()
        if self.kind == "gold":
            prompts = self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
            responses = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
            scores = torch.tensor(self.scorer(prompts, responses, response_ids), dtype=torch.float32)
        else:
            batch = collate_sequences(prompt_ids, response_ids, self.tokenizer.pad_token_id)
            scores = torch.empty(len(prompt_ids))
            for rows, _, mb in micro_batches(batch, self.micro_batch_size):
                mb = {k: v.to(self.device) for k, v in mb.items()}
                values = self.model(mb["input_ids"], mb["attention_mask"])
                last = last_token_index(mb["attention_mask"])
                scores[rows] = values.gather(1, last.unsqueeze(1)).squeeze(1).cpu()
            if self.normalize:
                scores = (scores - self.model.reward_mean) / self.model.reward_std
        return {"scores": scores, "seconds": torch.tensor(time.perf_counter() - start)}
