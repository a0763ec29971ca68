"""Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating
KL divergence"). Shapes: ``logp``, ``ref_logp`` (...) log-probs of the sampled tokens under
the policy and the reference; the result has the same shape."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3"]


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: KLEstimator = "k3") -> Tensor:
    """``k1 = log pi - log pi_ref`` (unbiased, can be negative, high variance);
    ``k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1`` (unbiased, always >= 0,
    low variance; the estimator GRPO uses, Shao et al. 2024 eq. 4)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl estimator must be k1 or k3, got {kind!r}")
