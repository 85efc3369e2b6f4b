"""One actor holding both the evaluated policy and the frozen reference: exact KL without shipping logits.

KL(π‖π_ref) needs both models' full next-token distributions at every response position ([T, V]
per sample). Sending those between processes would cost B·T·V floats per batch; holding both models
in one actor costs one extra copy of the weights instead, and only [B] numbers leave it.
"""

from __future__ import annotations

import torch

from actors.math.batch import Batch, micro_batches
from actors.math.kl import sequence_kl
from actors.math.logprobs import position_ids_from_mask, sequence_logprobs
from actors.models import folder_weights, load_causal_lm, resolve_model_path
from actors.worker import ModelWorker


class KLScorerActor(ModelWorker):
    role = "kl-scorer"

    def __init__(self, model: str, reference: str, **kwargs):
        super().__init__(model, **kwargs)
        self.model.requires_grad_(False)
        self.reference_name = reference
        self.reference = load_causal_lm(resolve_model_path(reference), device=self.device)
        self.reference.requires_grad_(False)

    def load_policy(self, path: str) -> str:
        """Score another saved policy of the same architecture: its weights replace the current ones
        in place (the reference stays), so one scorer serves every policy of an evaluation stage."""
        weights = folder_weights(path)
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"{path}: weights do not fit the scorer's model (missing {sorted(set(missing) - tied)[:3]}, "
                             f"unexpected {unexpected[:3]})")
        self.model_name = path
        return path

    def _forward(self, model, mb: Batch) -> torch.Tensor:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        return model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                     position_ids=position_ids_from_mask(mb["attention_mask"]), use_cache=False).logits

    @torch.no_grad()
    def score(self, batch: Batch, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Per row: log π(y|x), log π_ref(y|x) (both at ``temperature``, the distribution the samples
        were drawn from) and the exact KL summed over the response, from the same forward passes."""
        if temperature <= 0:
            raise ValueError(f"KL is scored at a sampling temperature > 0, got {temperature}")
        self.model.eval()
        rows_total = batch["input_ids"].shape[0]
        out = {name: torch.zeros(rows_total) for name in ("logp_policy", "logp_reference", "kl_exact")}
        # micro_batches trims only all-padding columns: each row's sums stay whole
        for rows, _, mb in micro_batches(batch, self.micro_batch_size):
            ids, mask = mb["input_ids"].to(self.device), mb["loss_mask"].to(self.device)
            policy, reference = self._forward(self.model, mb), self._forward(self.reference, mb)
            out["logp_policy"][rows] = sequence_logprobs(policy / temperature, ids, mask).sum.cpu()
            out["logp_reference"][rows] = sequence_logprobs(reference / temperature, ids, mask).sum.cpu()
            out["kl_exact"][rows] = sequence_kl(policy, reference, mask, temperature).cpu()
        return out
