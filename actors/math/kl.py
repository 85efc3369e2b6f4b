"""Exact per-token KL(π‖π_ref) from both models' full next-token distributions.

The sampled k1 estimate log π(y) − log π_ref(y) can be negative on a finite sample; summing the exact
per-position KL Σ_v p(v)(log p(v) − log q(v)) over the response cannot (each term is a KL, ≥ 0), and
has far lower variance because it integrates over the vocabulary instead of sampling one token.
"""

from __future__ import annotations

import torch


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(policy/T) ‖ softmax(reference/T)) at every position: [..., V] -> [...].

    The same temperature divides both models' logits, so the KL is between the distributions the
    evaluation samples from (defect c: scoring at T = 1 after sampling at T ≠ 1 mixes two things).
    """
    if temperature <= 0:
        raise ValueError(f"token_kl needs temperature > 0, got {temperature}")
    logp = torch.log_softmax(policy_logits.float() / temperature, dim=-1)
    logq = torch.log_softmax(reference_logits.float() / temperature, dim=-1)
    # clamp: rounding can leave a tiny negative where the two distributions are equal
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)


def sequence_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, loss_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """Per-row KL summed over the response: logits [B, T, V], loss_mask [B, T] -> [B].

    Shifted like ``actors.math.logprobs.sequence_logprobs``: the distribution at position t predicts
    token t+1, so response token t+1 is counted through ``logits[:, t]`` and ``loss_mask[:, t+1]``.
    """
    per_token = token_kl(policy_logits[:, :-1], reference_logits[:, :-1], temperature)
    return (per_token * loss_mask[:, 1:].to(per_token.dtype)).sum(-1)
