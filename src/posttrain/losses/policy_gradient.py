"""Clipped policy-gradient losses of the GRPO family: GRPO, DAPO, Dr. GRPO, GSPO.

One function, ``grpo_loss``; the variants are its parameters (DESIGN.md §3):

- ratio clipping with separate ``eps_low`` / ``eps_high`` (DAPO's clip-higher, Yu et al. 2025);
- ``importance_sampling``: ``token`` (PPO/GRPO) or ``sequence`` (GSPO, Zheng et al. 2025);
- ``aggregation``: ``grpo`` (mean over each sequence's tokens, then over sequences; Shao et
  al. 2024), ``dapo`` (one token-mean over the whole batch), ``dr_grpo`` (sum over tokens
  divided by a constant, #sequences x max_new_tokens; Liu et al. 2025);
- a KL penalty to a reference, ``beta * KL`` with the k1 or k3 estimator (``losses/kl.py``).

Notation: ``S`` completions in this micro-batch, ``T`` their padded length.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from posttrain.losses.kl import KLEstimator, kl_estimate

Aggregation = Literal["grpo", "dapo", "dr_grpo"]
ImportanceSampling = Literal["token", "sequence"]


def aggregation_count(aggregation: Aggregation, num_sequences: int, num_tokens: int,
                      max_len: int) -> float:
    """A micro-batch's share of the loss normaliser; the engine sums it over the whole
    accumulated batch, so accumulation equals one big batch:

        grpo     -> sequences           (each sequence's token-mean, averaged over sequences)
        dapo     -> completion tokens   (one token-mean over the batch)
        dr_grpo  -> sequences * max_len (a constant: no length bias)
    """
    if aggregation == "grpo":
        return float(num_sequences)
    if aggregation == "dapo":
        return float(num_tokens)
    if aggregation == "dr_grpo":
        return float(num_sequences * max_len)
    raise ValueError(f"aggregation must be grpo, dapo or dr_grpo, got {aggregation!r}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    normalizer: float,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: Aggregation = "grpo",
    importance_sampling: ImportanceSampling = "token",
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate of seed §5.6 (EQ 5.6 gives ``advantages``), as a loss to minimise.

    Per token (``token`` importance sampling):

        r_it = exp(logp_it - old_logp_it)
        l_it = -min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_it

    ``sequence`` (GSPO eq. 5): ``r_i = exp(mean_t(logp_it - old_logp_it))`` (length-normalised
    sequence ratio), ``l_i = -min(r_i A_i, clip(r_i) A_i)`` given to each token of sequence i.

    Aggregation (``normalizer`` = the sum of ``aggregation_count`` over the accumulated
    batch): ``grpo`` sums ``mean_t l_it`` over sequences; ``dapo`` and ``dr_grpo`` sum
    ``l_it`` over all tokens; each then divides by ``normalizer``.

    Shapes: ``logp`` (S, T) current policy log-probs of the sampled tokens (with grad);
    ``old_logp`` (S, T) those of the policy that sampled (detached); ``advantages`` (S,);
    ``mask`` (S, T) bool, True on completion tokens that count (a fully masked row, e.g. a
    masked truncated completion, contributes nothing); ``ref_logp`` (S, T) or None.

    Metrics (this micro-batch, token-means over ``mask``): ``grpo/clip_frac_low`` (A < 0
    and r < 1 - eps_low: the lower clip is active), ``grpo/clip_frac_high`` (A > 0 and
    r > 1 + eps_high), ``grpo/ratio_mean``, ``grpo/kl`` (when a reference is given),
    ``grpo/pg_loss``.
    """
    m = mask.to(logp.dtype)
    lengths = m.sum(-1).clamp_min(1.0)  # (S,)
    A = advantages[:, None].to(logp.dtype)  # (S, 1)
    log_ratio = (logp - old_logp) * m
    if importance_sampling == "token":
        ratio = torch.exp(log_ratio)  # (S, T)
    elif importance_sampling == "sequence":
        ratio = torch.exp(log_ratio.sum(-1, keepdim=True) / lengths[:, None]).expand_as(logp)
    else:
        raise ValueError(f"importance_sampling must be token or sequence, got "
                         f"{importance_sampling!r}")
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * A, clipped * A)  # (S, T)
    pg = per_token
    kl = None
    if ref_logp is not None and beta != 0.0:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
    if aggregation == "grpo":
        total = ((per_token * m).sum(-1) / lengths).sum()
    elif aggregation in ("dapo", "dr_grpo"):
        total = (per_token * m).sum()
    else:
        raise ValueError(f"aggregation must be grpo, dapo or dr_grpo, got {aggregation!r}")
    loss = total / normalizer
    with torch.no_grad():
        n_tok = m.sum().clamp_min(1.0)
        tok_mean = lambda x: (x.float() * m).sum() / n_tok  # noqa: E731
        metrics = {
            "grpo/clip_frac_low": tok_mean((ratio < 1.0 - eps_low) & (A < 0)),
            "grpo/clip_frac_high": tok_mean((ratio > 1.0 + eps_high) & (A > 0)),
            "grpo/ratio_mean": tok_mean(ratio),
            "grpo/pg_loss": tok_mean(pg),
        }
        if kl is not None:
            metrics["grpo/kl"] = tok_mean(kl)
    return loss, metrics
