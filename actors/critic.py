"""The PPO critic: per-token values from an LM backbone + scalar head (initialised from the reward model)."""

from __future__ import annotations

import time

import torch

from actors.batch import Batch, micro_batches
from actors.runtime import configure_threads, describe_actor, pick_device, quiet_transformers, seed_everything
from actors.value_model import ScalarHeadModel


class CriticActor:
    role = "critic"

    def __init__(self, model: str, *, seed: int = 0, torch_threads: int | None = None, dtype: str = "float32",
                 micro_batch_size: int = 8):
        quiet_transformers()
        configure_threads(torch_threads)
        seed_everything(seed)
        self.device = pick_device()
        self.model = ScalarHeadModel.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.micro_batch_size = micro_batch_size

    def info(self) -> dict:
        return describe_actor(self.role, self.device, parameters=sum(p.numel() for p in self.model.parameters()))

    @torch.no_grad()
    def values(self, batch: Batch) -> dict[str, torch.Tensor]:
        """V(s_t) aligned with the shifted token log-probs: [B, T-1], zero outside the response."""
        start = time.perf_counter()
        rows_total, width = batch["input_ids"].shape
        values = torch.zeros(rows_total, width - 1)
        for rows, cols, mb in micro_batches(batch, self.micro_batch_size):
            mb = {k: v.to(self.device) for k, v in mb.items()}
            out = self.model(mb["input_ids"], mb["attention_mask"])[:, :-1]
            values[rows, cols.start:cols.stop - 1] = (out * mb["loss_mask"][:, 1:]).cpu()
        return {"values": values, "seconds": torch.tensor(time.perf_counter() - start)}
