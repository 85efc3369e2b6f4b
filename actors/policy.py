"""The trainable policy: log-probs, optimizer steps for SFT / DPO / PPO, weights for sync, saving."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from actors.batch import Batch, micro_batches
from actors.logprobs import sequence_logprobs
from actors.optim import OptimizerConfig, build_optimizer, build_scheduler
from actors.worker import ModelWorker

# A loss over one micro-batch: returns (mean loss of that micro-batch, metrics to average).
MicroLoss = Callable[[Batch], tuple[torch.Tensor, dict[str, float]]]


class PolicyActor(ModelWorker):
    role = "policy"

    def __init__(self, model: str, *, optimizer: OptimizerConfig | dict | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.optimizer_config = OptimizerConfig(**optimizer) if isinstance(optimizer, dict) else (optimizer or OptimizerConfig())
        self.optimizer_config.validate()
        self.optimizer = build_optimizer(self.model.parameters(), self.optimizer_config)
        self.scheduler = build_scheduler(self.optimizer, self.optimizer_config)
        self.global_step = 0
        self.nonfinite_steps = 0

    # -- the one optimizer step every objective shares ------------------------------------------
    def _optimizer_step(self, chunks, loss_fn: MicroLoss) -> dict[str, float]:
        """Accumulate gradients over micro-batches weighted by their share of rows, clip, step.

        A non-finite loss or gradient skips the update (the step is counted, weights untouched).
        """
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        chunks = list(chunks)
        total_rows = sum(rows for rows, _ in chunks)
        sums: dict[str, float] = {}
        tokens = 0
        finite = True
        for rows, mb in chunks:
            with self._autocast():
                loss, metrics = loss_fn(mb)
            weight = rows / total_rows
            finite &= bool(torch.isfinite(loss))
            if finite:
                (loss * weight).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
            tokens += int(mb["attention_mask"].sum())
        grad_norm = float("nan")
        if finite:
            max_norm = self.optimizer_config.max_grad_norm or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
        self.global_step += 1
        self.model.eval()
        seconds = time.perf_counter() - start
        sums.update({"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "skipped_nonfinite": float(not finite),
                     "tokens": float(tokens), "timing_s/update": seconds})
        return sums

    # -- objectives --------------------------------------------------------------------------------
    def train_sft(self, batch: Batch, micro_batch_size: int | None = None) -> dict[str, float]:
        """Supervised fine-tuning: mean token NLL on the response (loss_mask) tokens only."""

        def loss_fn(mb: Batch):
            out = sequence_logprobs(self._logits(mb), mb["input_ids"].to(self.device), mb["loss_mask"].to(self.device))
            nll = -out.token_logps.sum() / out.mask.sum().clamp(min=1)
            return nll, {"loss": float(nll)}

        chunks = [(rows.stop - rows.start, mb) for rows, _, mb in micro_batches(batch, micro_batch_size or self.micro_batch_size)]
        return self._optimizer_step(chunks, loss_fn)

    # -- state ------------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """An HF folder that AutoModelForCausalLM.from_pretrained loads (safetensors + tokenizer)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return str(folder)
