"""Classic RLHF with PPO (seed §5.4, EQ 5.3 and EQ 5.4): the token-level pieces.

An LLM completion is an episode: state ``s_t`` = prompt + the first ``t`` completion tokens,
action = token ``t``. The RLHF objective (EQ 5.3)

    max_theta  E_{x, y ~ pi_theta} [ r_phi(x, y) ]  -  beta * KL[ pi_theta(.|x) || pi_ref(.|x) ]

becomes a per-token reward (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022):

    r_t  = -beta * kl_t  +  1[t = T] * score(x, y)
    kl_t = log pi_old(y_t | s_t) - log pi_ref(y_t | s_t)

so that ``sum_t r_t = score - beta * KL_seq`` (k1 estimator: the sum of ``kl_t`` over a sampled
completion is an unbiased estimate of the sequence KL). A value model ``V(s_t)`` gives GAE
advantages (Schulman et al. 2016), and PPO's clipped surrogate (EQ 5.4; Schulman et al. 2017)
trains the policy; a clipped squared error trains the value model.

Notation: ``S`` completions, ``T`` their padded length; ``mask`` (S, T) bool marks real
completion tokens (each row's True entries are a prefix: the padding sits at the end).
Every loss divides a token sum by ``normalizer`` (the number of completion tokens of the
whole accumulated minibatch), so gradient accumulation equals one large minibatch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from posttrain.losses.kl import KLEstimator, kl_estimate


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``(x - mean) / std`` over the real tokens of the whole batch (population std); padding
    is returned as 0. ``shift_mean=False`` only rescales (keeps the sign of the mean).
    ``total`` sums a partial sum over every process holding a share of the batch (an
    all-reduce), so each share is whitened with the whole batch's statistics."""
    total = total or (lambda t: t)
    m = mask.to(x.dtype)
    count = total(m.sum()).clamp_min(1.0)
    mean = total((x * m).sum()) / count
    var = total(((x - mean) ** 2 * m).sum()) / count
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_penalized_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float,
    estimator: KLEstimator = "k1",
) -> tuple[Tensor, Tensor]:
    """EQ 5.3 as per-token rewards: ``r_t = -beta * kl_t``, plus the sequence's ``score`` on
    its last real token.

    ``scores`` (S,) one scalar per completion (reward model or reward functions, any
    penalties included); ``logp``/``ref_logp`` (S, T) log-probs of the sampled tokens under
    the sampling policy and the frozen reference. Returns ``(rewards (S, T), kl (S, T))``,
    both 0 on padding. ``k1`` (default) keeps ``sum_t r_t = score - beta * KL_seq``; ``k3``
    is always >= 0 per token but biased as a per-token reward.
    """
    m = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, estimator) * m  # (S, T)
    rewards = -beta * kl
    last = (m.sum(-1).long() - 1).clamp_min(0)  # (S,) index of each last real token
    has_tokens = (m.sum(-1) > 0).to(rewards.dtype)
    final = (scores.to(rewards.dtype) * has_tokens)[:, None]  # (S, 1)
    rewards = rewards.scatter_add(1, last[:, None], final)
    return rewards, kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), backwards in time:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_{T} = 0: the episode ends after
        A_t     = delta_t + gamma * lam * A_{t+1}       the last real token)
        R_t     = A_t + V_t                             (the value model's target)

    ``rewards``, ``values`` (S, T); returns ``(advantages, returns)`` (S, T), 0 on padding.
    ``lam = 1`` gives Monte-Carlo returns minus V; ``lam = 0`` the one-step TD error.
    """
    m = mask.to(values.dtype)
    v = values * m
    r = rewards * m
    T = r.shape[1]
    adv = torch.zeros_like(r)
    next_adv = torch.zeros_like(r[:, 0])
    next_v = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_v - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        next_v = v[:, t]
        adv[:, t] = next_adv
    return adv, (adv + v) * m


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, normalizer: float, *,
    epsilon: float = 0.2, dual_clip: float | None = None, entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, EQ 5.4 (Schulman et al. 2017, eq. 7), per token:

        rho_t = exp(logp_t - old_logp_t)
        l_t   = -min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t)
        dual clip (Ye et al. 2020), A_t < 0 only:  l_t = min(l_t, -c * A_t),  c = dual_clip > 1
        loss  = [sum_t l_t - entropy_coef * sum_t H_t] / normalizer

    Without the dual clip a negative advantage with a huge ratio gives an unbounded loss;
    with it, ``-c * A`` caps it. ``logp`` (S, T) with grad; ``old_logp`` (S, T) detached
    (the policy that sampled, before this rollout's first update); ``advantages`` (S, T)
    per token (GAE); ``entropy`` (S, T) with grad, needed when ``entropy_coef > 0``.

    Metrics (token means over ``mask``): ``ppo/approx_kl`` (k3 estimate of
    KL(pi_old || pi_theta), ``(rho - 1) - log rho``), ``ppo/clipfrac`` (|rho - 1| > eps),
    ``ppo/dual_clipfrac``, ``ppo/ratio_mean``, ``ppo/policy_loss``, ``ppo/entropy``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    m = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * m
    ratio = torch.exp(log_ratio)  # (S, T)
    A = advantages.to(logp.dtype)
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon)
    per_token = -torch.minimum(ratio * A, clipped * A)
    dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        cap = -dual_clip * A
        dual_active = (A < 0) & (per_token > cap)
        per_token = torch.where(A < 0, torch.minimum(per_token, cap), per_token)
    total = (per_token * m).sum()
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the per-token entropy (with grad)")
        total = total - entropy_coef * (entropy * m).sum()
    loss = total / normalizer
    with torch.no_grad():
        metrics = {
            "ppo/approx_kl": _masked_mean((ratio - 1.0) - log_ratio, mask),
            "ppo/clipfrac": _masked_mean(((ratio - 1.0).abs() > epsilon).float(), mask),
            "ppo/dual_clipfrac": _masked_mean(dual_active.float(), mask),
            "ppo/ratio_mean": _masked_mean(ratio, mask),
            "ppo/policy_loss": _masked_mean(per_token, mask),
        }
        if entropy is not None:
            metrics["ppo/entropy"] = _masked_mean(entropy.detach(), mask)
    return loss, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, normalizer: float, *,
    clip_range: float | None = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2's critic loss; Schulman et al. 2017 code, Ziegler et al. 2019):

        V_clip = V_old + clip(V - V_old, -c, c)
        l_t    = 0.5 * max((V_t - R_t)^2, (V_clip_t - R_t)^2)      (c = clip_range)
        loss   = sum_t l_t / normalizer

    so one update cannot move a value estimate more than ``c`` away from the one the
    advantages were computed with. ``clip_range=None`` gives the plain ``0.5 (V - R)^2``.
    ``values`` (S, T) with grad; ``old_values``, ``returns`` (S, T) detached.

    Metrics: ``ppo/value_loss``, ``ppo/value_clipfrac`` (tokens where the clipped term is the
    larger one, i.e. clipping is active), ``ppo/value_mean``.
    """
    m = mask.to(values.dtype)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token = 0.5 * unclipped
        active = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (v_clip - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        active = clipped > unclipped
    loss = (per_token * m).sum() / normalizer
    with torch.no_grad():
        metrics = {
            "ppo/value_loss": _masked_mean(per_token, mask),
            "ppo/value_clipfrac": _masked_mean(active.float(), mask),
            "ppo/value_mean": _masked_mean(values, mask),
        }
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over real tokens: 1 = the value model predicts the returns
    perfectly, 0 = no better than a constant, < 0 = worse. NaN when the returns have no spread."""
    var_r = _masked_mean((returns - _masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = _masked_mean((diff - _masked_mean(diff, mask)) ** 2, mask)
    return float("nan") if float(var_r) == 0.0 else float(1.0 - var_d / var_r)


def adaptive_kl_beta(beta: float, kl: float, target: float, horizon: float,
                     n_steps: int) -> float:
    """Ziegler et al. (2019) §2.2's adaptive KL coefficient, a proportional controller:

        e     = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    ``kl`` the rollout's mean sequence KL (nats), ``n_steps`` the sequences it holds. KL above
    the target raises beta (a tighter leash); below, lowers it.
    """
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + err * n_steps / horizon)
