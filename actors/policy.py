"""The trainable policy: log-probs, optimizer steps for SFT / DPO / PPO, weights for sync, saving."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Callable

import torch

from actors.batch import Batch, micro_batches, pair_micro_batches
from actors.dpo_losses import preference_loss
from actors.logprobs import sequence_logprobs
from actors.optim import OptimizerConfig, build_optimizer, build_scheduler
from actors.worker import ModelWorker

# One micro-batch's forward pass: returns (mean loss over its rows, metrics to average by rows).
MicroLoss = Callable[[], tuple[torch.Tensor, dict[str, float]]]


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
    def _optimizer_step(self, parts: list[tuple[int, MicroLoss]]) -> dict[str, float]:
        """Accumulate gradients over micro-batches weighted by their share of rows, clip, step.

        ``parts`` holds (rows, closure) pairs; each closure runs one micro-batch's forward pass and
        returns (mean loss over its rows, metrics). A non-finite loss or gradient skips the update
        (counted in ``skipped_nonfinite``; weights and optimizer state untouched).
        """
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_rows = sum(rows for rows, _ in parts)
        sums: dict[str, float] = {}
        finite = True
        for rows, run in parts:
            with self._autocast():
                loss, metrics = run()
            weight = rows / total_rows
            finite &= bool(torch.isfinite(loss))
            if finite:
                (loss * weight).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if k == "tokens" else weight)
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
        sums.update({"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                     "skipped_nonfinite": float(not finite), "timing_s/update": time.perf_counter() - start})
        return sums

    def _response_logprobs(self, mb: Batch):
        return sequence_logprobs(self._logits(mb), mb["input_ids"].to(self.device), mb["loss_mask"].to(self.device))

    # -- SFT ----------------------------------------------------------------------------------------
    def train_sft(self, batch: Batch, micro_batch_size: int | None = None) -> dict[str, float]:
        """Supervised fine-tuning: mean token NLL on the response (loss_mask) tokens only."""

        def part(mb: Batch):
            def run():
                out = self._response_logprobs(mb)
                nll = -out.token_logps.sum() / out.mask.sum().clamp(min=1)
                return nll, {"loss": float(nll.detach()), "tokens": float(mb["attention_mask"].sum())}
            return run

        return self._optimizer_step([(rows.stop - rows.start, part(mb)) for rows, _, mb
                                     in micro_batches(batch, micro_batch_size or self.micro_batch_size)])

    # -- DPO family ---------------------------------------------------------------------------------
    def _preference_forward(self, mb: Batch, ref_chosen, ref_rejected, loss: dict):
        """One forward pass over chosen+rejected rows of some pairs -> (mean loss, metrics)."""
        out = self._response_logprobs(mb)
        n = mb["input_ids"].shape[0] // 2
        chosen_len, rejected_len = out.length[:n], out.length[n:]
        result = preference_loss(
            loss["variant"], out.sum[:n], out.sum[n:],
            None if ref_chosen is None else ref_chosen.to(out.sum.device),
            None if ref_rejected is None else ref_rejected.to(out.sum.device),
            chosen_lengths=chosen_len, rejected_lengths=rejected_len,
            chosen_nll=-(out.sum[:n] / chosen_len.clamp(min=1)),
            **{k: v for k, v in loss.items() if k != "variant"},
        )
        margins = result.chosen_rewards - result.rejected_rewards
        policy_chosen, policy_rejected = out.sum[:n].detach(), out.sum[n:].detach()
        metrics = {
            "loss": float(result.losses.detach().mean()),
            "rewards/chosen": float(result.chosen_rewards.mean()),
            "rewards/rejected": float(result.rejected_rewards.mean()),
            "rewards/accuracies": float((margins > 0).float().mean()),
            "rewards/margins": float(margins.mean()),
            "logps/chosen": float(policy_chosen.mean()),
            "logps/rejected": float(policy_rejected.mean()),
            "tokens": float(mb["attention_mask"].sum()),
        }
        return result.losses.mean(), metrics

    def train_dpo(self, batch: Batch, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                  loss: dict, micro_batch_size: int | None = None) -> dict[str, float]:
        """One optimizer step on B pairs (``batch`` from ``collate_pairs``), accumulated over micro-batches.

        ``ref_*`` are the reference's summed response log-probs ([B]), None for reference-free variants.
        """
        parts = []
        for index, mb in pair_micro_batches(batch, micro_batch_size or self.micro_batch_size):
            rc = None if ref_chosen is None else ref_chosen[index]
            rr = None if ref_rejected is None else ref_rejected[index]
            parts.append((len(index), functools.partial(self._preference_forward, mb, rc, rr, loss)))
        return self._optimizer_step(parts)

    @torch.no_grad()
    def eval_dpo(self, batch: Batch, ref_chosen, ref_rejected, loss: dict,
                 micro_batch_size: int | None = None) -> dict[str, float]:
        """The same metrics as train_dpo on held-out pairs, without an update."""
        self.model.eval()
        pairs = batch["input_ids"].shape[0] // 2
        sums: dict[str, float] = {}
        for index, mb in pair_micro_batches(batch, micro_batch_size or self.micro_batch_size):
            rc = None if ref_chosen is None else ref_chosen[index]
            rr = None if ref_rejected is None else ref_rejected[index]
            with self._autocast():
                _, metrics = self._preference_forward(mb, rc, rr, loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * (1.0 if k == "tokens" else len(index) / pairs)
        return sums

    # -- state ------------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """An HF folder that AutoModelForCausalLM.from_pretrained loads (safetensors + tokenizer)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return str(folder)
