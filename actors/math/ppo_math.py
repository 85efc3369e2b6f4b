"""PPO / RLHF estimators as pure tensor functions (torch only; no Ray, no models).

Shapes follow OpenRLHF / TRL / verl: per-token tensors are [B, T] over the *response* tokens, right-padded,
with a ``mask`` (float 0/1 or bool, [B, T]) marking real response tokens. Per-sequence tensors are [B].
Every function takes tensors and returns tensors; nothing here modifies its inputs.

References
----------
* PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate, eq. 7).
* GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation".
* RLHF reward with a KL penalty and the adaptive KL controller: Ziegler et al. 2019, "Fine-Tuning
  Language Models from Human Preferences" (§2.2); Stiennon et al. 2020.
* KL estimators k1/k2/k3: J. Schulman, "Approximating KL Divergence" (2020 blog note).
* Best-of-N KL: Stiennon et al. 2020 (App.), Beirami et al. 2024 "Theoretical guarantees on the best-of-n
  alignment policy".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KL_KINDS = ("k1", "k2", "k3", "abs")


# ---------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------
def _as_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.dtype if like.is_floating_point() else torch.float32)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ x·m over ``dim`` (all entries when None). Entries outside the mask never contribute (even NaN)."""
    m = _as_weights(mask, x)
    xm = torch.where(m != 0, x * m, torch.zeros((), dtype=x.dtype, device=x.device))
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ x·m / Σ m over ``dim`` (all entries when None); 0 where the mask is empty (finite gradients)."""
    m = _as_weights(mask, x)
    total = masked_sum(x, m, dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries: mean((x − μ)²) over the mask, times n/(n − 1) when ``unbiased``
    (Bessel's correction, as TRL / OpenRLHF). Raises ValueError if the mask selects no entry, or only one
    entry with ``unbiased``."""
    m = _as_weights(mask, x)
    n = float(m.sum())
    if n == 0:
        raise ValueError("masked_var: the mask selects no entries")
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        if n <= 1:
            raise ValueError("masked_var: unbiased variance needs at least two masked entries")
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ) / sqrt(σ² + eps) with μ, σ² (unbiased) over the masked entries only; with ``shift_mean=False``
    the mean is added back (scale only, as TRL's ``masked_whiten``). Entries outside the mask are set to 0."""
    m = _as_weights(mask, x)
    mean, var = masked_mean(x, m), masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m != 0, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# ---------------------------------------------------------------------------------------------------
# KL estimators and the KL-penalised reward
# ---------------------------------------------------------------------------------------------------
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from log-probs of tokens *sampled from π* (Schulman's note).

    With log r = logp − ref (so π_ref/π = exp(−log r)):
      * ``k1`` = log r                         unbiased, high variance, can be negative
      * ``k2`` = ½ (log r)²                    biased (exact to 2nd order), ≥ 0, low variance
      * ``k3`` = exp(ref − logp) − 1 − (ref − logp)   unbiased, ≥ 0, low variance
      * ``abs`` = |log r|                      (OpenRLHF/verl option) biased, ≥ 0
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; choose from {', '.join(KL_KINDS)}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last masked (nonzero) position of each row, [B] long; −1 for a row with no token."""
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


SCORE_POOLINGS = ("last", "mean")


def pool_sequence_scores(values: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                         pooling: str = "last") -> torch.Tensor:
    """A sequence score [B] from a scalar head's per-position outputs ``values`` [B, T].

    ``last``: the output at the last real token (the usual reward-model readout: the whole sequence
    has been read there). ``mean``: the mean output over the response's positions (``response_mask``),
    so every response token adds its own term, as a lexicon-style judge sums word scores. A row with no
    response token scores 0 under ``mean``."""
    if pooling == "last":
        return values.gather(1, last_token_index(attention_mask).clamp(min=0).unsqueeze(1)).squeeze(1)
    if pooling == "mean":
        m = response_mask.to(values.dtype)
        return (values * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    raise ValueError(f"unknown score pooling {pooling!r}; choose from {', '.join(SCORE_POOLINGS)}")


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef, kind: str = "k1", clip_score: float | None = None):
    """Per-token RLHF reward (Ziegler et al. 2019; Stiennon et al. 2020):

        r_t = −kl_coef · KL̂_t  +  [t = last response token] · clip(score, −c, c)

    ``scores`` [B] (the reward model's sequence score), ``logprobs`` / ``ref_logprobs`` / ``mask`` [B, T].
    KL̂_t = ``kl_estimate(logprobs, ref_logprobs, kind)``. The score lands on the last masked token of
    each row (rows may have different lengths); a row with an empty mask gets no score and all-zero
    rewards. Returns ``(token_rewards [B, T], kl [B, T])``, both 0 outside the mask.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(m, kl_estimate(logprobs, ref_logprobs, kind), zero)
    rewards = -kl_coef * kl
    s = scores.to(rewards.dtype)
    if clip_score is not None:
        s = s.clamp(-clip_score, clip_score)
    last = last_token_index(mask)
    has_token = last >= 0
    at_last = F.one_hot(last.clamp(min=0), mask.shape[-1]).to(torch.bool) & has_token[:, None]
    rewards = rewards + torch.where(at_last, s[:, None], zero)
    return rewards, kl


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16), a reverse recursion over T:

        δ_t = r_t + γ V_{t+1} − V_t,     A_t = δ_t + γ λ A_{t+1},     returns R_t = A_t + V_t

    with V_{t+1} = 0 and A_{t+1} = 0 after the last valid token (the episode ends there: bootstrap 0).
    Tokens outside the mask are skipped — the recursion carries V and A across them (verl convention),
    which for right padding is exactly the usual per-row recursion. Loops over T, vectorised over B.
    Returns ``(advantages [B, T], returns [B, T])``, both 0 outside the mask. Inputs are not detached.
    """
    m = mask.bool()
    B, T = rewards.shape
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
    advantages = [None] * T
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        next_value = torch.where(m[:, t], values[:, t], next_value)
        next_adv = torch.where(m[:, t], adv, next_adv)
        advantages[t] = torch.where(m[:, t], adv, zero)
    advantages = torch.stack(advantages, dim=1)
    returns = torch.where(m, advantages + values, zero)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, §2.2)
# ---------------------------------------------------------------------------------------------------
class AdaptiveKLController:
    """β_{k+1} = β_k · (1 + e·n_steps/horizon),  e = clip(KL/target − 1, −0.2, 0.2)  (Ziegler et al. 2019)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not target > 0 or not horizon > 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps) -> float:
        """Update with the KL measured over the last ``n_steps`` samples (episodes); returns the new β."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * float(n_steps) / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


class FixedKLController:
    """A constant KL coefficient with the controller interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl=None, n_steps=None) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float, clip_eps_high: float | None = None):
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), token-level masked mean:

        ρ_t = exp(logp_t − old_t),   L = −mean_mask[ min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε_high) A_t) ]

    ``clip_eps_high`` defaults to ``clip_eps`` (asymmetric "clip-higher" as in DAPO when set).
    Returns ``(loss, clipfrac, approx_kl)`` as 0-d tensors; ``clipfrac`` = masked fraction of tokens where
    the clipped branch is strictly smaller (i.e. active in the min); ``approx_kl`` = masked mean of the k3
    estimator of KL(π_old ‖ π) on tokens sampled from π_old: ρ − 1 − log ρ (≥ 0). Both metrics are
    detached.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + high) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped < unclipped).to(loss.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None):
    """Clipped value loss (PPO2 baselines / OpenRLHF / TRL):

        V_clip = V_old + clip(V − V_old, −c, c),   L = ½ · mean_mask[ max((V − R)², (V_clip − R)²) ]

    ``clip_range=None`` disables clipping (L = ½ mean (V − R)²). Returns ``(loss, clipfrac)``; ``clipfrac``
    (detached) = masked fraction of tokens where the clipped error is strictly the larger one."""
    unclipped = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * masked_mean(unclipped, mask)
        return loss, torch.zeros((), dtype=loss.dtype, device=loss.device)
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: H = logsumexp(z) − Σ softmax(z)·z (stable; −inf logits,
    i.e. banned tokens, contribute 0). Shape: logits [..., V] → [...]."""
    probs = torch.softmax(logits, dim=-1)
    finite = logits.masked_fill(torch.isneginf(logits), 0.0)
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the masked entries (population variances; the ratio is the same with
    Bessel's correction). 1 = perfect, 0 = no better than a constant, < 0 worse. NaN when Var[R] = 0
    (the stable-baselines convention)."""
    var_r = masked_var(returns, mask, unbiased=False)
    var_res = masked_var(returns - values, mask, unbiased=False)
    if float(var_r) == 0.0:
        return torch.full_like(var_r, float("nan"))
    return 1 - var_res / var_r


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None):
    """Reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1; Llama-2's margin variant):

        L = mean[ −log σ(r_w − r_l − m) ],   accuracy = mean[ r_w > r_l ]

    ``margin`` ([B] or scalar) defaults to 0. Returns ``(loss, accuracy)`` as 0-d tensors (accuracy detached)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    accuracy = (chosen_scores > rejected_scores).to(loss.dtype).mean().detach()
    return loss, accuracy


def best_of_n_kl(n) -> torch.Tensor:
    """Analytic KL(π_BoN ‖ π) of Best-of-N sampling: log n − (n − 1)/n (Stiennon et al. 2020; Beirami et al.
    2024 show it is an upper bound on the true KL for discrete outcomes, approached only as every outcome's
    probability goes to 0). ``n`` ≥ 1, int or tensor → float64 tensor."""
    n = torch.as_tensor(n, dtype=torch.float64)
    if bool((n < 1).any()):
        raise ValueError(f"best_of_n_kl needs n >= 1, got {n.tolist()}")
    return torch.log(n) - (n - 1) / n
