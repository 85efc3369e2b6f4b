"""The DPO loss family as pure functions of sequence log-probabilities (torch only; no Ray, no models).

Notation. For a preference pair (y_w chosen, y_l rejected) of one prompt x, ``log π(y)`` is the policy's
log-probability of the response summed over its tokens, ``log π_ref(y)`` the same under the frozen
reference, and |y| the number of response tokens. Per-token averaged log-probs are ȳ = log π(y) / |y|.

    h     = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))       (summed log-probs)
    h_avg = (ȳ_w − ȳ_ref,w) − (ȳ_l − ȳ_ref,l)                                  (per-token averages)
    r̂(y)  = β·(log π(y) − log π_ref(y))    implicit reward (DPO, Rafailov et al. 2023, eq. 5)

Variants (every one is a small function below, dispatched from ``preference_loss``):

======================  =========================================================================
``sigmoid``             DPO (Rafailov et al. 2023):            −log σ(β h)
``cdpo``                conservative DPO, label smoothing ε:   −(1−ε) log σ(β h) − ε log σ(−β h)
``ipo``                 IPO (Azar et al. 2023), as TRL:        (h_avg − 1/(2β))²
``hinge``               SLiC (Zhao et al. 2023):               max(0, 1 − β h)
``robust``              rDPO (Chowdhury et al. 2024):          [(1−ε)(−log σ(βh)) − ε(−log σ(−βh))] / (1−2ε)
``simpo``               SimPO (Meng et al. 2024):              −log σ(β ȳ_w − β ȳ_l − γ)
``orpo``                ORPO (Hong et al. 2024):               NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l))
``reference_free``      DPO with a uniform π_ref:              −log σ(β (log π(y_w) − log π(y_l)))
======================  =========================================================================

Conventions chosen here (documented because papers and libraries differ):

* SimPO γ is the paper's *target reward margin* and is subtracted after β multiplies the averaged
  log-probs: −log σ(β ȳ_w − β ȳ_l − γ). TRL's CPO trainer (``loss_type="simpo"``) uses the same
  convention: its ``simpo_gamma`` is the full margin γ (it computes β(ȳ_w − ȳ_l) − simpo_gamma), so a
  TRL run's ``simpo_gamma`` is passed here unchanged.
* IPO uses per-token averaged log-probs for the loss (TRL's ``ipo`` with averaged log-probs), but its
  reported rewards are DPO's summed-log-prob implicit rewards β(log π − log π_ref), so the reward
  curves of every reference-based variant are on the same scale.
* Reference-free variants report β·(policy log-prob): averaged (β ȳ) for ``simpo`` and ``orpo`` — the
  length-normalised reward their papers report (ORPO's β only scales this logged reward; it does not
  enter the ORPO loss) — and summed (β log π) for ``reference_free``.
* ORPO odds use P(y) = exp(ȳ), so log odds(y) = ȳ − log(1 − exp(ȳ)), computed with the stable
  log(1 − eˣ) of Mächler (2012). ȳ is clamped to ≤ −(machine epsilon of the dtype) first, so a response
  the policy predicts with probability 1 gives a large but finite log odds instead of inf/NaN.
* ``label_smoothing`` is used only by ``cdpo`` and ``robust``; other variants ignore it.
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
    """Per-pair results of ``preference_loss``; all tensors have shape [B].

    ``losses`` carries the graph (take ``.mean()`` for the batch loss). ``chosen_rewards`` /
    ``rejected_rewards`` are detached implicit rewards (see the module docstring for each variant).
    ``logits`` (detached) is the variant's preference statistic: h for sigmoid/cdpo/hinge/robust,
    h_avg for ipo, β ȳ_w − β ȳ_l − γ for simpo, log odds(y_w) − log odds(y_l) for orpo, and
    log π(y_w) − log π(y_l) for reference_free (β not applied where β multiplies it inside the link).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    logits: torch.Tensor


# ---------------------------------------------------------------------------------------------------
# Per-variant losses. Each takes the statistic it needs and returns per-pair losses [B].
# ---------------------------------------------------------------------------------------------------
def sigmoid_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): L = −log σ(β h)."""
    return -F.logsigmoid(beta * h)


def cdpo_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"), labels flipped w.p. ε:
    L = −(1−ε) log σ(β h) − ε log σ(−β h)."""
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 8), an unbiased loss under flip rate ε:
    L = [(1−ε)(−log σ(β h)) − ε(−log σ(−β h))] / (1 − 2ε)."""
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def hinge_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF calibration loss (Zhao et al. 2023) on the DPO log-ratio: L = max(0, 1 − β h)."""
    return torch.relu(1 - beta * h)


def ipo_loss(h_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, with τ = β), per-token averaged log-ratios as in TRL:
    L = (h_avg − 1/(2β))²."""
    return (h_avg - 1 / (2 * beta)) ** 2


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float):
    """SimPO (Meng et al. 2024, eq. 6): L = −log σ(β ȳ_w − β ȳ_l − γ), γ the target reward margin.

    Returns (losses, logits)."""
    logits = beta * avg_chosen - beta * avg_rejected - gamma
    return -F.logsigmoid(logits), logits


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable at both ends (Mächler 2012): log(−expm1(x)) for x > −log 2,
    log1p(−exp(x)) otherwise."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds_ratio(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor) -> torch.Tensor:
    """log odds(y_w) − log odds(y_l), odds(y) = P/(1−P), log P = ȳ (Hong et al. 2024, eq. 4–6)."""
    eps = torch.finfo(avg_chosen.dtype).eps if avg_chosen.is_floating_point() else 1.1920929e-07
    a, b = avg_chosen.clamp(max=-eps), avg_rejected.clamp(max=-eps)
    return (a - log1m_exp(a)) - (b - log1m_exp(b))


def orpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, orpo_lambda: float,
              chosen_nll: torch.Tensor | None = None):
    """ORPO (Hong et al. 2024, eq. 6–7): L = L_SFT + λ·(−log σ(log odds(y_w) − log odds(y_l))),
    L_SFT = ``chosen_nll`` (per-example average token NLL of y_w; default −ȳ_w). Returns (losses, logits)."""
    log_odds = orpo_log_odds_ratio(avg_chosen, avg_rejected)
    nll = -avg_chosen if chosen_nll is None else chosen_nll
    return nll - orpo_lambda * F.logsigmoid(log_odds), log_odds


# ---------------------------------------------------------------------------------------------------
def _check_inputs(variant, tensors: dict, beta, label_smoothing, needs_reference, needs_lengths):
    if variant not in VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if needs_reference and (tensors["reference_chosen_logps"] is None or tensors["reference_rejected_logps"] is None):
        raise ValueError(f"variant {variant!r} needs reference log-probs "
                         "(reference_chosen_logps and reference_rejected_logps)")
    if needs_lengths and (tensors["chosen_lengths"] is None or tensors["rejected_lengths"] is None):
        raise ValueError(f"variant {variant!r} averages log-probs per token: pass chosen_lengths and rejected_lengths")
    if variant == "cdpo" and not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for 'cdpo', got {label_smoothing}")
    if variant == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError("label_smoothing must be in [0, 0.5) for 'robust' (it divides by 1 − 2ε), "
                         f"got {label_smoothing}")
    shape = tensors["policy_chosen_logps"].shape
    for name, value in tensors.items():
        if value is not None and value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} like policy_chosen_logps")


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
    """Per-pair losses and implicit rewards of one DPO-family variant (formulas: module docstring).

    Inputs are [B] tensors of summed response log-probs; ``chosen_lengths`` / ``rejected_lengths`` ([B],
    response token counts, clamped to ≥ 1) are required by ``ipo``, ``simpo`` and ``orpo``; reference
    log-probs by every variant not in ``REFERENCE_FREE_VARIANTS``. ``chosen_nll`` ([B]) is ORPO's SFT
    term. Raises ValueError for an unknown variant, β ≤ 0, missing inputs, an out-of-range
    ``label_smoothing`` (cdpo: [0, 0.5], robust: [0, 0.5)) or mismatched shapes.
    """
    needs_reference = variant not in REFERENCE_FREE_VARIANTS
    needs_lengths = variant in LENGTH_NORMALISED_VARIANTS
    _check_inputs(variant, {
        "policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps, "reference_rejected_logps": reference_rejected_logps,
        "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths, "chosen_nll": chosen_nll,
    }, beta, label_smoothing, needs_reference, needs_lengths)

    pc, pr = policy_chosen_logps, policy_rejected_logps
    if needs_reference:
        rc, rr = reference_chosen_logps, reference_rejected_logps
        h = (pc - rc) - (pr - rr)
        chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    if needs_lengths:
        len_c, len_r = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
        avg_c, avg_r = pc / len_c, pr / len_r

    if variant == "sigmoid":
        logits, losses = h, sigmoid_loss(h, beta)
    elif variant == "cdpo":
        logits, losses = h, cdpo_loss(h, beta, label_smoothing)
    elif variant == "robust":
        logits, losses = h, robust_loss(h, beta, label_smoothing)
    elif variant == "hinge":
        logits, losses = h, hinge_loss(h, beta)
    elif variant == "ipo":
        logits = (avg_c - rc / len_c) - (avg_r - rr / len_r)
        losses = ipo_loss(logits, beta)
    elif variant == "simpo":
        losses, logits = simpo_loss(avg_c, avg_r, beta, simpo_gamma)
        chosen_rewards, rejected_rewards = beta * avg_c, beta * avg_r
    elif variant == "orpo":
        losses, logits = orpo_loss(avg_c, avg_r, orpo_lambda, chosen_nll)
        chosen_rewards, rejected_rewards = beta * avg_c, beta * avg_r
    else:  # reference_free: DPO with log π_ref ≡ const, so the reference term of h cancels
        logits, losses = pc - pr, sigmoid_loss(pc - pr, beta)
        chosen_rewards, rejected_rewards = beta * pc, beta * pr

    return PreferenceLossOutput(losses=losses, chosen_rewards=chosen_rewards.detach(),
                                rejected_rewards=rejected_rewards.detach(), logits=logits.detach())


def dpo_reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose chosen response has the strictly higher implicit reward (0-d tensor)."""
    return (chosen_rewards > rejected_rewards).float().mean()


reward_accuracy = dpo_reward_accuracy  # earlier name, kept for callers
