"""The reward: a learned Bradley-Terry model (LM backbone + scalar head) or a gold scorer."""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Sequence

import torch

from actors.math.batch import Batch, collate_sequences, micro_batches, pair_micro_batches
from actors.models import load_tokenizer, resolve_model_path
from actors.runtime import configure_threads, describe_actor, pick_device, quiet_transformers, seed_everything
from actors.optim import OptimizerConfig, TrainableMixin
from actors.math.ppo_math import bradley_terry_loss, pool_sequence_scores
from actors.scorers import build_scorer
from actors.value_model import HEAD_META, ScalarHeadModel


class RewardModelActor(TrainableMixin):
    """``kind='learned'``: ``model`` is a causal LM or saved scalar-head folder.
    ``kind='gold'``: ``scorer`` is a spec understood by ``actors.scorers.build_scorer``.

    Both decode with ``tokenizer`` (the policy's), since actors receive token ids.

    Learned-model options: ``lora`` (adapters on the backbone, head fully trainable),
    ``gradient_checkpointing``, ``packing`` (see ``actors.value_model``) and ``offload_optimizer``
    (optimizer state on the CPU, ``actors.offload``; a no-op on a CPU-only machine).
    """

    role = "reward"

    def __init__(self, *, kind: str = "learned", model: str | None = None, scorer: str | None = None,
                 tokenizer: str | None = None, seed: int = 0, torch_threads: int | None = None,
                 dtype: str = "float32", micro_batch_size: int = 8, normalize: bool = True,
                 optimizer: OptimizerConfig | dict | None = None, lora: dict | None = None,
                 gradient_checkpointing: bool = False, packing: bool = False, offload_optimizer: bool = False,
                 freeze_layers: int = 0, pooling: str | None = None):
        quiet_transformers()
        configure_threads(torch_threads)
        seed_everything(seed)
        self.kind = kind
        self.device = pick_device()
        self.micro_batch_size = micro_batch_size
        self.normalize = normalize
        self.offload_optimizer = offload_optimizer
        if kind == "learned":
            if not model:
                raise ValueError("reward.kind 'learned' needs reward.model")
            self.model = ScalarHeadModel.from_pretrained(
                model, dtype=dtype, lora=lora, gradient_checkpointing=gradient_checkpointing, packing=packing,
                freeze_layers=freeze_layers,
            ).to(self.device).eval()
            if pooling is not None:  # a fresh head takes the requested readout; a saved one keeps its own
                if (Path(resolve_model_path(model)) / HEAD_META).exists() and pooling != self.model.pooling:
                    raise ValueError(f"reward model {model} was trained with pooling {self.model.pooling!r}, "
                                     f"not {pooling!r}")
                self.model.pooling = pooling
            self.tokenizer = load_tokenizer(tokenizer or model)
            if optimizer is not None:
                self.setup_optimizer(optimizer)
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

    def _autocast(self):
        return contextlib.nullcontext()

    def _pair_scores(self, mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        values = self.model(mb["input_ids"], mb["attention_mask"])
        scores = pool_sequence_scores(values, mb["attention_mask"], mb["loss_mask"], self.model.pooling)
        n = scores.shape[0] // 2
        return scores[:n], scores[n:]

    def _bt_forward(self, mb: Batch, margin: float):
        chosen, rejected = self._pair_scores(mb)
        loss, accuracy = bradley_terry_loss(chosen, rejected, torch.full_like(chosen, margin) if margin else None)
        return loss, {"loss": float(loss.detach()), "accuracy": float(accuracy),
                      "reward/chosen": float(chosen.detach().mean()), "reward/rejected": float(rejected.detach().mean()),
                      "tokens": float(mb["attention_mask"].sum())}

    def train_rm(self, batch: Batch, margin: float = 0.0, micro_batch_size: int | None = None) -> dict[str, float]:
        """One Bradley-Terry step, −log σ(r(x, y_w) − r(x, y_l) − margin), on B pairs (``collate_pairs``)."""
        if self.kind != "learned" or not hasattr(self, "optimizer"):
            raise RuntimeError("train_rm needs reward.kind='learned' and an optimizer")
        parts = [(len(index), functools.partial(self._bt_forward, mb, margin))
                 for index, mb in pair_micro_batches(batch, micro_batch_size or self.micro_batch_size)]
        return self._optimizer_step(parts)

    @torch.no_grad()
    def eval_rm(self, batch: Batch, micro_batch_size: int | None = None) -> dict[str, float]:
        """Held-out preference accuracy and mean margin of the raw (unnormalised) scores."""
        self.model.eval()
        sums = {"correct": 0.0, "margin_sum": 0.0, "pairs": 0.0}
        for item in self._my_share(list(pair_micro_batches(batch, micro_batch_size or self.micro_batch_size))):
            if item is None:  # sharded group: this rank has no pairs left but must keep in step
                self._idle_pass()
                continue
            c, r = self._pair_scores(item[1])
            sums["correct"] += float((c > r).sum())
            sums["margin_sum"] += float((c - r).sum())
            sums["pairs"] += float(len(c))
        sums = self._reduce_sums(sums)
        return {"accuracy": sums["correct"] / sums["pairs"], "margin": sums["margin_sum"] / sums["pairs"],
                "pairs": sums["pairs"]}

    def set_normalization(self, mean: float, std: float) -> None:
        """Stored with the model: scores of reference-policy samples then have mean 0 and std 1."""
        self.model.reward_mean, self.model.reward_std = float(mean), float(max(std, 1e-6))

    def save(self, path: str) -> str:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

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
            scores = self._score_batch(batch)["scores"]
        return {"scores": scores, "seconds": torch.tensor(time.perf_counter() - start)}

    @torch.no_grad()
    def _score_batch(self, batch: Batch, micro_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """The learned model's (normalised) score of each collated sequence, at its last real token."""
        self.model.eval()
        scores = torch.empty(batch["input_ids"].shape[0])
        for rows, _, mb in micro_batches(batch, micro_batch_size or self.micro_batch_size):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            values = self.model(mb["input_ids"], mb["attention_mask"])
            scores[rows] = pool_sequence_scores(values, mb["attention_mask"], mb["loss_mask"], self.model.pooling).cpu()
        if self.normalize:
            scores = (scores - self.model.reward_mean) / self.model.reward_std
        return {"scores": scores}
