"""Critic-free advantage estimators and loss aggregation as pure tensor functions (torch only).

Group estimators take per-sequence scores ``rewards`` [B] with B = P·k: the k samples of each prompt are
contiguous (rows g·k … g·k + k − 1 belong to prompt g), the order the generation workers return them in.
Token tensors are [B, T] over response tokens with a 0/1 ``mask``, as in ``ppo_math``.

References
----------
* RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs" (leave-one-out baseline, eq. 6); Kool et al. 2019.
* GRPO: Shao et al. 2024, "DeepSeekMath" §4.1 (outcome supervision: Â = (r − mean(r)) / std(r); KL to the
  reference in the loss with the k3 estimator, eq. 4). The std is torch's default *unbiased* one, as in
  TRL's ``GRPOTrainer`` (``rewards.view(-1, k).std(dim=1)``, eps 1e-4 added to the std).
* Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (no std
  normalisation; token losses summed and divided by a constant instead of each response's length).
* REINFORCE++: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"
  (per-token KL penalty in the reward, discounted return-to-go, advantages normalised over the global batch).
"""

from __future__ import annotations

import torch

from actors.math.ppo_math import gae_advantages, kl_penalized_rewards, masked_mean, masked_sum, masked_whiten

ESTIMATORS = ("rloo", "grpo", "dr_grpo", "reinforce_pp")
GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """[B] → [P, k]; rejects a batch that is not whole groups (a silent reshape would mix prompts)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [P*k], got shape {tuple(rewards.shape)}")
    if k < 2:
        raise ValueError(f"group advantages need k >= 2 samples per prompt, got k={k}")
    if rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of k={k}")
    return rewards.reshape(-1, k)


def _constant_groups(g: torch.Tensor) -> torch.Tensor:
    """[P, 1] bool: every sample of the prompt has the same reward. Tested by max == min, not std < tol,
    because float32 mean(r) of equal values can differ from r by an ulp and (r − mean)/std would then
    be ±O(1) noise instead of 0."""
    return (g.amax(dim=1, keepdim=True) == g.amin(dim=1, keepdim=True))


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = r_i − mean_{j≠i} r_j within each prompt's k samples, [B]. Uses the identity
    mean_{j≠i} r_j = (Σ_j r_j − r_i)/(k − 1); equal rewards give exactly 0 (masked, see above)."""
    g = _groups(rewards, k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    adv = torch.where(_constant_groups(g), torch.zeros_like(g), g - baseline)
    return adv.reshape(-1)


def grpo_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4, scale_by_std: bool = True) -> torch.Tensor:
    """Â_i = (r_i − mean(r)) / (std(r) + eps) per prompt, std unbiased (Bessel, as TRL), [B].
    ``scale_by_std=False`` is Dr. GRPO's r_i − mean(r). A group of equal rewards gets 0, not NaN."""
    g = _groups(rewards, k)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(dim=1, unbiased=True, keepdim=True) + eps)
    adv = torch.where(_constant_groups(g), torch.zeros_like(g), centred)
    return adv.reshape(-1)


def dr_grpo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Dr. GRPO: r_i − mean(r) per prompt (no std normalisation), [B]."""
    return grpo_advantages(rewards, k, scale_by_std=False)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{s ≥ t} γ^{s−t} r_s over each row's masked tokens, [B, T] (0 outside the mask).
    This is GAE with V ≡ 0 and λ = 1 (δ_t = r_t), so the masked reverse recursion is reused."""
    zeros = torch.zeros_like(token_rewards)
    advantages, _ = gae_advantages(token_rewards, zeros, mask, gamma=gamma, lam=1.0)
    return advantages


def reinforce_pp_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                            mask: torch.Tensor, kl_coef: float, gamma: float = 1.0, kl_kind: str = "k1",
                            eps: float = 1e-8):
    """REINFORCE++: r_t = −β·KL̂_t + [t = last]·score, G_t = discounted return-to-go, then
    A = (G − μ)/sqrt(σ² + eps) with μ, σ² (unbiased) over every masked token of the whole batch (not per
    prompt: the paper's point against GRPO's per-group normalisation). Returns ``(advantages, kl)``, [B, T]."""
    token_rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kind=kl_kind)
    returns = discounted_returns(token_rewards, mask, gamma)
    return masked_whiten(returns, mask, shift_mean=True, eps=eps), kl


def sequence_advantages(estimator: str, rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Dispatch for the group estimators (``rloo | grpo | dr_grpo``), [B]."""
    if estimator == "rloo":
        return rloo_advantages(rewards, k)
    if estimator == "grpo":
        return grpo_advantages(rewards, k)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(rewards, k)
    raise ValueError(f"unknown group estimator {estimator!r}; choose from {', '.join(GROUP_ESTIMATORS)}")


def to_tokens(seq_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome supervision: every response token of row i carries A_i (DeepSeekMath §4.1.2), [B, T]."""
    m = mask.to(seq_advantages.dtype)
    return seq_advantages[:, None] * m


def aggregate_token_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
                         normalizer: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar (verl's ``loss_agg_mode`` names):

    * ``token-mean``: Σ_{i,t} ℓ·m / Σ m (every token weighs the same; PPO's ``policy_loss``);
    * ``seq-mean-token-mean``: mean_i (Σ_t ℓ·m / |o_i|) (GRPO as published: per-response length normalised);
    * ``seq-mean-token-sum-norm``: Σ_{i,t} ℓ·m / (B · normalizer) with a constant ``normalizer`` (Dr. GRPO;
      the maximum response length), so a long response is not down-weighted per token.
    """
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=1).mean()
    if mode == "seq-mean-token-sum-norm":
        if normalizer is None or not normalizer > 0:
            raise ValueError(f"seq-mean-token-sum-norm needs a constant normalizer > 0, got {normalizer}")
        return masked_sum(per_token, mask) / (per_token.shape[0] * float(normalizer))
    raise ValueError(f"unknown loss aggregation {mode!r}; choose from {', '.join(LOSS_AGG_MODES)}")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float, kl_coef: float,
              mode: str = "seq-mean-token-mean", normalizer: float | None = None):
    """DeepSeekMath eq. 3/4: ℓ_t = −[min(ρ_t A_t, clip(ρ_t, 1 ± ε) A_t) − β·k3_t] with ρ_t = exp(logp − old),
    k3_t = exp(ref − logp) − (ref − logp) − 1 (KL(π‖π_ref) ≥ 0, gradient through logp), reduced by ``mode``.
    Returns ``(loss, kl)`` with ``kl`` the detached masked token mean of k3."""
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    delta = ref_logprobs - logprobs
    k3 = torch.expm1(delta) - delta
    loss = aggregate_token_loss(-(surrogate - kl_coef * k3), mask, mode, normalizer)
    return loss, masked_mean(k3.detach(), mask)
