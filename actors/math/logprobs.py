"""Per-token and per-sequence log-probabilities with masks: the one function every actor uses.

Batch convention (all [B, T], any padding side):
- ``input_ids``: prompt followed by response tokens;
- ``attention_mask``: 1 on real tokens, 0 on padding;
- ``loss_mask``: 1 on the tokens whose log-probability counts (the response).

Token-level outputs are "shifted": position t holds log p(input_ids[t+1] | input_ids[:t+1]),
so they have shape [B, T-1] and their mask is ``loss_mask[:, 1:]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceLogprobs:
    token_logps: torch.Tensor  # [B, T-1], zero where the mask is zero
    mask: torch.Tensor         # [B, T-1], float
    sum: torch.Tensor          # [B] summed response log-prob
    length: torch.Tensor       # [B] number of response tokens

    @property
    def mean(self) -> torch.Tensor:
        """Per-token average log-prob (IPO, SimPO, ORPO); 0 for an empty response."""
        return self.sum / self.length.clamp(min=1)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] without materialising the full log-softmax ([..., V] -> [...])."""
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                      temperature: float = 1.0) -> SequenceLogprobs:
    """Log-probs of ``input_ids[:, 1:]`` under ``logits[:, :-1] / temperature``, masked to the response tokens.

    ``temperature`` is the sampling temperature the tokens were drawn at: a sampler at T draws from
    softmax(logits / T), so that is the distribution whose log-probs a trainer's ratio and KL must use."""
    if not temperature > 0:
        raise ValueError(f"log-probs need a temperature > 0, got {temperature}")
    mask = loss_mask[:, 1:].to(torch.float32)
    shifted = logits[:, :-1]
    if temperature != 1.0:
        shifted = shifted.float() / temperature
    logps = token_logprobs(shifted, input_ids[:, 1:]) * mask
    return SequenceLogprobs(token_logps=logps, mask=mask, sum=logps.sum(-1), length=mask.sum(-1))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left- and right-padded rows get the same logits."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)

