"""Preference losses: Bradley–Terry reward models (seed EQ 5.2) and the DPO family (EQ 5.5).

Every function is pure: tensors in, ``(loss, metrics)`` out. Notation: ``B`` pairs (or
unpaired examples) in this micro-batch. Log-probabilities are per *sequence*: the sum over
completion tokens of log pi(y_t | x, y_<t) (``posttrain.models.logprobs``), or that sum
divided by the completion length where a loss is length-normalised (IPO, SimPO, ORPO).

Normalisation: each loss is the *sum* over the micro-batch's pairs divided by ``normalizer``,
the number of pairs in the whole accumulated step, so gradient accumulation equals one
large batch's pair mean (DESIGN.md §3).

INSTRUMENT 5.1 (seed §5.3): the loss's gradient with respect to the margin is
sigma(-margin). Pairs with sigma(-margin) < 0.01 are solved and stop teaching
(``*/saturated_frac``); pairs with margin < 0 are misordered and dominate the update
(``*/misordered_frac``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SATURATION = 0.01  # gradient weight sigma(-margin) below which a pair counts as solved

DPO_VARIANTS = ("dpo", "robust", "ipo", "hinge")

Metrics = dict[str, Tensor]


def margin_instrument(margin: Tensor, prefix: str) -> Metrics:
    """INSTRUMENT 5.1 for margins ``(B,)``: saturated and misordered fractions."""
    m = margin.detach().float()
    return {
        f"{prefix}/saturated_frac": (torch.sigmoid(-m) < SATURATION).float().mean(),
        f"{prefix}/misordered_frac": (m < 0).float().mean(),
        f"{prefix}/margin": m.mean(),
    }


def bradley_terry_loss(
    chosen: Tensor,
    rejected: Tensor,
    normalizer: float,
    *,
    margin: Tensor | None = None,
    center_weight: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Reward-model loss under Bradley–Terry (seed EQ 5.2).

        L = sum_i [ -log sigma(r_w - r_l - m_i) + c (r_w + r_l)^2 ] / normalizer

    ``chosen`` r(x, y_w) and ``rejected`` r(x, y_l) are (B,) scalar rewards; ``margin`` (B,)
    is an optional per-pair required gap m_i (Llama 2, Touvron et al. 2023, eq. 2; 0 when
    absent). ``center_weight`` c > 0 adds the reward-centring penalty of Eisenstein et al.
    2023 ("Helping or herding?"): the rewards' scale is unidentified by EQ 5.2, and the
    penalty pins the pair's mean reward near 0.

    Metrics: ``rm/accuracy`` (r_w > r_l), ``rm/margin`` (mean r_w - r_l), ``rm/chosen``,
    ``rm/rejected`` and INSTRUMENT 5.1 (``rm/saturated_frac``, ``rm/misordered_frac``).
    """
    chosen, rejected = chosen.float(), rejected.float()
    delta = chosen - rejected
    target = delta if margin is None else delta - margin.float()
    loss = -F.logsigmoid(target).sum()
    if center_weight > 0:
        loss = loss + center_weight * ((chosen + rejected) ** 2).sum()
    metrics = margin_instrument(delta, "rm")
    metrics.update({
        "rm/accuracy": (delta.detach() > 0).float().mean(),
        "rm/chosen": chosen.detach().mean(),
        "rm/rejected": rejected.detach().mean(),
    })
    return loss / normalizer, metrics


def _reward_metrics(chosen: Tensor, rejected: Tensor) -> Metrics:
    c, r = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(), "rewards/accuracies": (c > r).float().mean(),
    }


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    normalizer: float,
    *,
    beta: float = 0.1,
    variant: str = "dpo",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """DPO and its reference-based variants. All inputs are (B,) sequence log-probs.

    With log-ratios rho_w = log pi(y_w|x) - log pi_ref(y_w|x) (same for y_l) and
    h = rho_w - rho_l, ``variant`` picks:

    - ``dpo`` (Rafailov et al. 2023, seed EQ 5.5): ``-log sigma(beta h)``. With
      ``label_smoothing`` eps > 0 it is conservative DPO (cDPO, Mitchell 2023), which
      assumes a fraction eps of labels are flipped:
      ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``.
    - ``robust`` (rDPO, Chowdhury et al. 2024, eq. 6): the unbiased loss under label noise
      eps: ``[-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)``.
    - ``ipo`` (Azar et al. 2023, eq. 17): ``(h - 1 / (2 tau))^2`` with tau = ``beta``. Pass
      length-normalised log-probs (per-token means) as TRL does; the paper uses sums.
    - ``hinge`` (SLiC-HF, Zhao et al. 2023): ``max(0, 1 - beta h)``.

    Implicit rewards ``beta * rho`` give ``rewards/{chosen,rejected,margins,accuracies}``;
    ``dpo/margin`` is beta h, and INSTRUMENT 5.1 (``dpo/saturated_frac``,
    ``dpo/misordered_frac``) is measured on it for every variant.
    """
    if variant not in DPO_VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; choose from {DPO_VARIANTS}")
    rho_w = policy_chosen.float() - ref_chosen.float()
    rho_l = policy_rejected.float() - ref_rejected.float()
    z = beta * (rho_w - rho_l)  # (B,)
    eps = label_smoothing
    if variant == "dpo":
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif variant == "robust":
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif variant == "ipo":
        losses = (rho_w - rho_l - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - z)
    metrics = margin_instrument(z, "dpo")
    metrics.update(_reward_metrics(beta * rho_w, beta * rho_l))
    return losses.sum() / normalizer, metrics


def simpo_loss(
    chosen_avg: Tensor,
    rejected_avg: Tensor,
    normalizer: float,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised.

        L = -log sigma( beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma )

    ``chosen_avg``/``rejected_avg`` (B,) are per-token mean log-probs of each completion;
    ``gamma`` is the target reward margin. Rewards are ``beta * avg_logp``.
    """
    rw, rl = beta * chosen_avg.float(), beta * rejected_avg.float()
    z = rw - rl - gamma
    metrics = margin_instrument(z, "simpo")
    metrics.update(_reward_metrics(rw, rl))
    return -F.logsigmoid(z).sum() / normalizer, metrics


def _log_odds(avg_logp: Tensor) -> Tensor:
    # log(p / (1 - p)) with p = exp(avg_logp) < 1; log1p(-exp(x)) is exact for small p.
    x = avg_logp.clamp(max=-1e-6)
    return x - torch.log1p(-torch.exp(x))


def orpo_loss(
    chosen_avg: Tensor,
    rejected_avg: Tensor,
    normalizer: float,
    *,
    lam: float = 0.1,
) -> tuple[Tensor, Metrics]:
    """ORPO (Hong et al. 2024, eqs. 6–7): NLL on the chosen plus an odds-ratio term.

        odds(y) = p / (1 - p),  p = exp(avg_logp(y))
        L = -avg_logp(y_w) - lam * log sigma( log odds(y_w) - log odds(y_l) )

    ``chosen_avg``/``rejected_avg`` (B,) are per-token mean log-probs, so the NLL term is the
    chosen completion's token-mean NLL (per pair, then summed over pairs / normalizer).
    No reference model. Rewards are ``lam * avg_logp`` (as TRL logs them).
    """
    cw, cl = chosen_avg.float(), rejected_avg.float()
    log_or = _log_odds(cw) - _log_odds(cl)  # (B,)
    nll = -cw
    losses = nll - lam * F.logsigmoid(log_or)
    metrics = margin_instrument(log_or, "orpo")
    metrics.update(_reward_metrics(lam * cw, lam * cl))
    metrics["orpo/nll"] = nll.detach().mean()
    metrics["orpo/log_odds_ratio"] = log_or.detach().mean()
    return losses.sum() / normalizer, metrics


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    normalizer: float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired examples.

        r = log pi(y|x) - log pi_ref(y|x)          (B,)
        z0 = max(0, kl)                            scalar, no gradient
        L = w_d (1 - sigma(beta (r - z0)))   if y is desirable
            w_u (1 - sigma(beta (z0 - r)))   otherwise

    ``desirable`` (B,) bool labels. ``kl`` is the batch estimate of KL(pi || pi_ref): the
    mean log-ratio of *mismatched* (prompt_i, completion_j) pairs, as in the paper; it is
    detached here (the paper back-propagates through neither). Losses are summed over
    examples and divided by ``normalizer``.
    """
    r = policy_logps.float() - ref_logps.float()
    z0 = kl.detach().float().clamp(min=0)
    d = desirable.bool()
    losses = torch.where(
        d,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    rew = (beta * r).detach()
    metrics = {"kto/kl": z0, "kto/desirable_frac": d.float().mean()}
    # Absent (not NaN) when the micro-batch has no example of a kind.
    if d.any():
        metrics["rewards/chosen"] = rew[d].mean()
    if (~d).any():
        metrics["rewards/rejected"] = rew[~d].mean()
    return losses.sum() / normalizer, metrics


def chosen_nll(chosen_avg: Tensor, normalizer: float, weight: float) -> tuple[Tensor, Metrics]:
    """Optional NLL on the chosen completion added to DPO (RPO, Pang et al. 2024):
    ``weight * sum_i -avg_logp(y_w_i) / normalizer``. Keeps the chosen likelihood from
    falling while the margin grows (DPO alone can lower both)."""
    nll = -chosen_avg.float()
    return weight * nll.sum() / normalizer, {"dpo/chosen_nll": nll.detach().mean()}
