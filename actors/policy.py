"""The trainable policy: log-probs, optimizer steps for SFT / DPO / PPO, weights for sync, saving."""

from __future__ import annotations

import functools
import time

import torch

from actors.math.batch import Batch, micro_batches, pair_micro_batches, slice_batch
from actors.math.dpo_losses import preference_loss
from actors.math.logprobs import sequence_logprobs
from actors.optim import OptimizerConfig, TrainableMixin
from actors.math.ppo_math import entropy_from_logits, kl_estimate, masked_mean, policy_loss
from actors.ppo_update import PPOUpdateConfig
from actors.worker import ModelWorker


class PolicyActor(TrainableMixin, ModelWorker):
    role = "policy"

    def __init__(self, model: str, *, optimizer: OptimizerConfig | dict | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.setup_optimizer(optimizer)

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

    @torch.no_grad()
    def eval_sft(self, batch: Batch, micro_batch_size: int | None = None) -> dict[str, float]:
        """Summed response NLL and token count on held-out rows (the driver divides to get NLL/token)."""
        self.model.eval()
        nll, tokens = 0.0, 0.0
        for item in self._my_share(list(micro_batches(batch, micro_batch_size or self.micro_batch_size))):
            if item is None:  # sharded group: this worker has no rows left but must keep in step
                self._idle_pass()
                continue
            out = self._response_logprobs(item[2])
            nll -= float(out.token_logps.sum())
            tokens += float(out.mask.sum())
        return self._reduce_sums({"nll_sum": nll, "response_tokens": tokens})

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
        for item in self._my_share(list(pair_micro_batches(batch, micro_batch_size or self.micro_batch_size))):
            if item is None:  # sharded group: this worker has no pairs left but must keep in step
                self._idle_pass()
                continue
            index, mb = item
            rc = None if ref_chosen is None else ref_chosen[index]
            rr = None if ref_rejected is None else ref_rejected[index]
            with self._autocast():
                _, metrics = self._preference_forward(mb, rc, rr, loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * (1.0 if k == "tokens" else len(index) / pairs)
        return self._reduce_sums(sums)

    # -- PPO --------------------------------------------------------------------------------------
    def train_ppo(self, batch: Batch, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  ppo: PPOUpdateConfig | dict, ref_logprobs: torch.Tensor | None = None) -> dict[str, float]:
        """Several epochs of clipped-surrogate updates over minibatches of one rollout.

        ``old_logprobs`` / ``advantages`` are [B, T-1] in the shifted layout, the log-probs at
        ``ppo.temperature`` (the rollout's). Epoch 0 walks the rollout in order, in micro-batches of the size
        the rollout log-probs were computed with, so its first minibatch reproduces those log-probs exactly
        (ratio 1); later epochs are shuffled (seeded). With ``ppo.kl_in_loss_coef > 0`` the KL to ``ref_logprobs``
        (same temperature) is a loss term instead of a reward. A dict is read as ``PPOUpdateConfig(**ppo)``.
        """
        ppo = PPOUpdateConfig.coerce(ppo)
        start_all = time.perf_counter()
        rows = batch["input_ids"].shape[0]
        minibatch, micro = ppo.minibatch_size, ppo.micro_batch_size
        generator = torch.Generator().manual_seed(ppo.seed + self.global_step)
        history: list[dict[str, float]] = []
        first_ratio_dev = None
        for epoch in range(ppo.epochs):
            order = torch.arange(rows) if epoch == 0 else torch.randperm(rows, generator=generator)
            for start in range(0, rows, minibatch):
                index = order[start:start + minibatch]
                # Each micro-batch's token-mean loss is weighted by its share of the MINIBATCH's response
                # tokens, so the update is Σ token losses / minibatch tokens whatever the micro-batch size
                # (weighting by rows would make it depend on how rows are grouped). The FSDP path divides
                # by the same global total: every rank sees all of ``parts``.
                response_tokens = batch["loss_mask"][:, 1:].sum(-1)
                parts = [(float(response_tokens[index[k:k + micro]].sum()),
                          functools.partial(self._ppo_forward, batch, index[k:k + micro],
                                            old_logprobs, advantages, ref_logprobs, ppo))
                         for k in range(0, len(index), micro)]
                metrics = self._optimizer_step(parts)
                if first_ratio_dev is None:
                    first_ratio_dev = metrics["actor/ratio_max_dev"]
                history.append(metrics)
        mean = {k: sum(m[k] for m in history) / len(history) for k in history[0] if k != "tokens"}
        mean["actor/ratio_max_dev_first_minibatch"] = first_ratio_dev
        mean["actor/updates"] = float(len(history))
        mean["tokens"] = sum(m["tokens"] for m in history)
        mean["timing_s/total"] = time.perf_counter() - start_all
        return mean

    def _ppo_forward(self, batch: Batch, index: torch.Tensor, old_logprobs, advantages, ref_logprobs,
                     ppo: PPOUpdateConfig):
        cols, mb = slice_batch(batch, index)
        token_cols = slice(cols.start, cols.stop - 1)
        logits = self._logits(mb)
        out = sequence_logprobs(logits, mb["input_ids"].to(self.device), mb["loss_mask"].to(self.device),
                                ppo.temperature)
        old = old_logprobs[index][:, token_cols].to(out.token_logps.device)
        adv = advantages[index][:, token_cols].to(out.token_logps.device)
        pg_loss, clipfrac, approx_kl = policy_loss(out.token_logps, old, adv, out.mask, ppo.clip_eps,
                                                   ppo.clip_eps_high)
        # the entropy of the distribution the rollout was sampled from (logits / T)
        scaled = logits[:, :-1] if ppo.temperature == 1.0 else logits[:, :-1].float() / ppo.temperature
        entropy = masked_mean(entropy_from_logits(scaled), out.mask)
        loss = pg_loss - ppo.entropy_coef * entropy
        kl_coef = ppo.kl_in_loss_coef
        kl_term = torch.zeros(())
        if kl_coef:
            if ref_logprobs is None:
                raise ValueError("train_ppo: kl_in_loss_coef > 0 needs the reference's log-probs (ref_logprobs)")
            ref = ref_logprobs[index][:, token_cols].to(out.token_logps.device)
            kl_term = masked_mean(kl_estimate(out.token_logps, ref, ppo.kl_estimator), out.mask)
            loss = loss + kl_coef * kl_term
        ratio_dev = ((out.token_logps.detach() - old).exp() - 1).abs() * out.mask
        return loss, {"actor/pg_loss": float(pg_loss.detach()), "actor/pg_clipfrac": float(clipfrac),
                      "actor/approx_kl": float(approx_kl), "actor/entropy": float(entropy.detach()),
                      "actor/kl_loss": float(kl_term.detach()), "actor/kl_in_loss_coef": float(kl_coef),
                      "actor/ratio_max_dev": float(ratio_dev.max()),
                      "tokens": float(mb["attention_mask"].sum())}

    # -- state ------------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """An HF folder that AutoModelForCausalLM.from_pretrained loads (safetensors + tokenizer); with
        LoRA the merged weights, plus the adapter alone in ``<path>/adapter``."""
        return self.save_pretrained_model(path)
