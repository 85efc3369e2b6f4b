"""The PPO critic: per-token values from an LM backbone + scalar head (initialised from the reward model)."""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import torch

from actors.math.batch import Batch, micro_batches, slice_batch
from actors.optim import OptimizerConfig, TrainableMixin
from actors.math.ppo_math import explained_variance, value_loss
from actors.ppo_update import PPOUpdateConfig
from actors.runtime import configure_threads, describe_actor, pick_device, quiet_transformers, seed_everything
from actors.value_model import ScalarHeadModel


class CriticActor(TrainableMixin):
    role = "critic"

    def __init__(self, model: str, *, seed: int = 0, torch_threads: int | None = None, dtype: str = "float32",
                 micro_batch_size: int = 8, optimizer: OptimizerConfig | dict | None = None,
                 lora: dict | None = None, gradient_checkpointing: bool = False, packing: bool = False,
                 offload_optimizer: bool = False, freeze_layers: int = 0):
        quiet_transformers()
        configure_threads(torch_threads)
        seed_everything(seed)
        self.device = pick_device()
        self.offload_optimizer = offload_optimizer  # read by setup_optimizer (actors.offload)
        self.model = ScalarHeadModel.from_pretrained(
            model, dtype=dtype, lora=lora, gradient_checkpointing=gradient_checkpointing, packing=packing,
            freeze_layers=freeze_layers,  # embeddings + lowest K layers frozen: a shorter backward
        ).to(self.device).eval()
        # PPO's rewards are the reward model's normalised scores: start the values on that scale.
        self.model.fold_normalization()
        self.micro_batch_size = micro_batch_size
        self.setup_optimizer(optimizer or OptimizerConfig(lr=1e-5, eps=1e-5))

    def info(self) -> dict:
        return describe_actor(self.role, self.device, parameters=sum(p.numel() for p in self.model.parameters()),
                              trainable_parameters=sum(p.numel() for p in self.model.parameters() if p.requires_grad))

    def _autocast(self):
        return contextlib.nullcontext()

    def _values(self, mb: Batch) -> torch.Tensor:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        return self.model(mb["input_ids"], mb["attention_mask"])[:, :-1] * mb["loss_mask"][:, 1:]

    @torch.no_grad()
    def values(self, batch: Batch, micro_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """V(s_t) aligned with the shifted token log-probs: [B, T-1], zero outside the response."""
        start = time.perf_counter()
        rows_total, width = batch["input_ids"].shape
        values = torch.zeros(rows_total, width - 1)
        for rows, cols, mb in micro_batches(batch, micro_batch_size or self.micro_batch_size):
            values[rows, cols.start:cols.stop - 1] = self._values(mb).cpu()
        return {"values": values, "seconds": torch.tensor(time.perf_counter() - start)}

    def train_value(self, batch: Batch, old_values: torch.Tensor, returns: torch.Tensor,
                    ppo: PPOUpdateConfig | dict) -> dict[str, float]:
        """Clipped value-loss updates over the same epochs/minibatches as the policy (``ppo.value_clip``,
        the loss scaled by ``ppo.vf_coef``). A dict is read as ``PPOUpdateConfig(**ppo)``."""
        ppo = PPOUpdateConfig.coerce(ppo)
        start_all = time.perf_counter()
        rows = batch["input_ids"].shape[0]
        minibatch, micro = ppo.minibatch_size, ppo.micro_batch_size
        generator = torch.Generator().manual_seed(ppo.seed + 7919 + self.global_step)
        history = []
        for epoch in range(ppo.epochs):
            order = torch.arange(rows) if epoch == 0 else torch.randperm(rows, generator=generator)
            for start in range(0, rows, minibatch):
                index = order[start:start + minibatch]
                parts = [(len(index[k:k + micro]), functools.partial(self._value_forward, batch, index[k:k + micro],
                                                                      old_values, returns, ppo))
                         for k in range(0, len(index), micro)]
                history.append(self._optimizer_step(parts))
        mean = {k: sum(m[k] for m in history) / len(history) for k in history[0] if k != "tokens"}
        mean["timing_s/total"] = time.perf_counter() - start_all
        mask = batch["loss_mask"][:, 1:].float()
        mean["critic/vf_explained_var"] = float(explained_variance(old_values, returns, mask))
        return {("critic/" + k if not k.startswith("critic/") else k): v for k, v in mean.items()}

    def _value_forward(self, batch, index, old_values, returns, ppo):
        cols, mb = slice_batch(batch, index)
        token_cols = slice(cols.start, cols.stop - 1)
        values = self._values(mb)
        mask = mb["loss_mask"][:, 1:].to(values.device).float()
        loss, clipfrac = value_loss(values, old_values[index][:, token_cols].to(values.device),
                                    returns[index][:, token_cols].to(values.device), mask, ppo.value_clip)
        # critic/vf_loss is the value loss itself; the optimizer sees it scaled by vf_coef
        return ppo.vf_coef * loss, {"critic/vf_loss": float(loss.detach()), "critic/vf_clipfrac": float(clipfrac),
                      "tokens": float(mb["attention_mask"].sum())}

    def save(self, path: str) -> str:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        return path
