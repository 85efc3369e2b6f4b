"""The DPO loss family as pure functions of sequence log-probabilities (no Ray, no models).

Notation: for a pair (y_w chosen, y_l rejected) with summed response log-probs log π(y) under the
policy and log π_ref(y) under the frozen reference,

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

and the implicit reward of a response is r̂(y) = β·(log π(y) − log π_ref(y)) (DPO paper, eq. 5).
Every variant is written out explicitly in ``preference_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

VARIANTS = ("sigmoid", "cdpo", "ipo", "hinge", "robust", "simpo", "orpo", "reference_free")
REFERENCE_FREE_VARIANTS = ("simpo", "orpo", "reference_free")
LENGTH_NORMALISED_VARIANTS = ("ipo", "simpo", "orpo")


@dataclass
class PreferenceLossOutput:
    losses: torch.Tensor            # [B] per-pair loss
    chosen_rewards: torch.Tensor    # [B] detached
    rejected_rewards: torch.Tensor  # [B] detached
    logits: torch.Tensor            # [B] the quantity inside the link function (before β where β multiplies it)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_loss(
    variant: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
    chosen_nll: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Per-pair losses and implicit rewards for one DPO-family variant.

    - ``sigmoid`` (DPO, Rafailov et al. 2023): −log σ(β h).
    - ``cdpo`` (conservative DPO, label smoothing ε): −(1−ε) log σ(β h) − ε log σ(−β h).
    - ``ipo`` (Azar et al. 2023): (h̄ − 1/(2β))², h̄ built from per-token averaged log-probs.
    - ``hinge`` (SLiC, Zhao et al. 2023): max(0, 1 − β h).
    - ``robust`` (Chowdhury et al. 2024): [(1−ε)(−log σ(β h)) − ε(−log σ(−β h))] / (1 − 2ε).
    - ``simpo`` (Meng et al. 2024): −log σ(β·ȳ_w − β·ȳ_l − γ), ȳ = per-token average log π(y);
      γ is the target reward margin as in the SimPO paper (TRL's ``simpo_gamma`` is γ/β).
    - ``orpo`` (Hong et al. 2024): NLL(y_w) + λ·(−log σ(log odds(y_w) − log odds(y_l))),
      odds(y) = P/(1−P) with log P = per-token average log π(y); ``chosen_nll`` defaults to −ȳ_w.
    - ``reference_free``: DPO with a uniform reference (the reference term of h is zero).

    Rewards: r̂ = β(log π − log π_ref) for variants with a reference (IPO included, summed log-probs
    as in DPO's definition); for SimPO and ORPO β·ȳ (their papers' length-normalised reward); for
    reference_free β·log π.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    needs_reference = variant not in REFERENCE_FREE_VARIANTS
    if needs_reference and (reference_chosen_logps is None or reference_rejected_logps is None):
        raise ValueError(f"variant {variant!r} needs reference log-probs (reference_chosen_logps, reference_rejected_logps)")
    if variant in LENGTH_NORMALISED_VARIANTS and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"variant {variant!r} averages log-probs per token: pass chosen_lengths and rejected_lengths")
    if variant in ("cdpo", "robust") and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for {variant!r}, got {label_smoothing}")

    pc, pr = policy_chosen_logps, policy_rejected_logps
    if needs_reference:
        rc, rr = reference_chosen_logps, reference_rejected_logps
        h = (pc - rc) - (pr - rr)
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    if variant in LENGTH_NORMALISED_VARIANTS:
        avg_c = pc / chosen_lengths.clamp(min=1)
        avg_r = pr / rejected_lengths.clamp(min=1)

    if variant == "sigmoid":
        logits = h
        losses = -F.logsigmoid(beta * h)
    elif variant == "cdpo":
        logits = h
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif variant == "robust":
        logits = h
        eps = label_smoothing
        losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif variant == "hinge":
        logits = h
        losses = torch.relu(1 - beta * h)
    elif variant == "ipo":
        ref_avg_c = rc / chosen_lengths.clamp(min=1)
        ref_avg_r = rr / rejected_lengths.clamp(min=1)
        logits = (avg_c - ref_avg_c) - (avg_r - ref_avg_r)
        losses = (logits - 1 / (2 * beta)) ** 2
    elif variant == "simpo":
        logits = beta * avg_c - beta * avg_r - simpo_gamma
        losses = -F.logsigmoid(logits)
        chosen_rewards, rejected_rewards = beta * avg_c, beta * avg_r
    elif variant == "orpo":
        log_odds = (avg_c - _log1m_exp(avg_c)) - (avg_r - _log1m_exp(avg_r))
        logits = log_odds
        nll = -avg_c if chosen_nll is None else chosen_nll
        losses = nll - orpo_lambda * F.logsigmoid(log_odds)
        chosen_rewards, rejected_rewards = beta * avg_c, beta * avg_r
    else:  # reference_free
        logits = pc - pr
        losses = -F.logsigmoid(beta * logits)
        chosen_rewards, rejected_rewards = beta * pc, beta * pr

    return PreferenceLossOutput(losses=losses, chosen_rewards=chosen_rewards.detach(),
                                rejected_rewards=rejected_rewards.detach(), logits=logits.detach())


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose chosen response has the higher implicit reward."""
    return (chosen_rewards > rejected_rewards).float().mean()
