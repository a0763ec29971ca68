"""Critic-free advantages from grouped rewards: GRPO (EQ 5.6), RLOO, REINFORCE++.

Notation: ``B`` prompts (groups), ``G`` completions per prompt. ``rewards`` is (B, G); every
function returns advantages of the same shape, one scalar per completion, which the policy
loss broadcasts over the completion's tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Scale = Literal["group", "batch", "none"]
Estimator = Literal["grpo", "rloo", "reinforce_pp"]

# Rewards closer than this count as equal: the group has zero spread (see zero_spread_groups).
ZERO_SPREAD_ATOL = 1e-6


def _safe_div(x: Tensor, std: Tensor) -> Tensor:
    # A zero-spread batch (all rewards equal) has x == 0: its advantage is 0, not 0/0.
    return torch.where(std > 0, x / std.clamp_min(1e-12), torch.zeros_like(x))


def _zero_flat_groups(rewards: Tensor, adv: Tensor) -> Tensor:
    """Exactly 0 for the groups ``zero_spread_groups`` flags, so that the rule which skips
    them and the advantage agree (rewards 0.5 and 0.5 + 1e-7 are a tie, not +-1)."""
    return torch.where(zero_spread_groups(rewards)[:, None], torch.zeros_like(adv), adv)


def group_advantages(rewards: Tensor, scale: Scale = "group") -> Tensor:
    """GRPO's group-relative advantage, seed EQ 5.6 (Shao et al. 2024, DeepSeekMath):

        A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)

    ``scale``: ``group`` divides by each group's std (EQ 5.6); ``batch`` by the std of all
    B*G rewards (Hu 2025, REINFORCE++-baseline; more robust when a group's std is tiny);
    ``none`` does not divide (Dr. GRPO, Liu et al. 2025: the std term biases toward
    too-easy and too-hard prompts). std is the population std (divide by G), as in EQ 5.6's
    worked example: rewards (1, 0, 1, 0) give a correct answer advantage exactly 1 (TRL uses
    the sample std, which gives 0.866). A group with zero spread (``zero_spread_groups``:
    max - min <= ``ZERO_SPREAD_ATOL``) gets advantage exactly 0.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (B, G)
    if scale == "none":
        adv = centred
    elif scale == "group":
        adv = _safe_div(centred, rewards.std(dim=1, keepdim=True, correction=0))
    elif scale == "batch":
        adv = _safe_div(centred, rewards.std(correction=0))
    else:
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return _zero_flat_groups(rewards, adv)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): the baseline of sample i is the mean
    of the other G-1 rewards of its group, ``A_i = r_i - mean_{j != i} r_j
    = G/(G-1) * (r_i - mean_j r_j)``. Needs G >= 2. A zero-spread group gets exactly 0."""
    G = rewards.shape[1]
    if G < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt")
    return _zero_flat_groups(rewards, (rewards - rewards.mean(dim=1, keepdim=True)) * (G / (G - 1)))


def reinforce_pp_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE++ (Hu 2025): no per-group baseline; rewards are whitened over the whole
    batch, ``A = (r - mean(r)) / std(r)`` over all B*G completions. (Its "-baseline" variant
    is ``group_advantages(r, scale="batch")``.)"""
    return _safe_div(rewards - rewards.mean(), rewards.std(correction=0))


def compute_advantages(rewards: Tensor, estimator: Estimator = "grpo",
                       scale: Scale = "group") -> Tensor:
    """Dispatch by name; ``scale`` applies to ``grpo`` only."""
    if estimator == "grpo":
        return group_advantages(rewards, scale)
    if estimator == "rloo":
        return rloo_advantages(rewards)
    if estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards)
    raise ValueError(f"unknown advantage estimator {estimator!r}")


def zero_spread_groups(rewards: Tensor, atol: float = ZERO_SPREAD_ATOL) -> Tensor:
    """(B,) bool: groups whose rewards are all equal (all right or all wrong). They carry
    zero advantage, so they teach nothing (seed INSTRUMENT 5.2; DAPO's dynamic sampling
    drops them)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) <= atol


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward:

        0                                   if L <= max_len - buffer
        penalty * (max_len - buffer - L) / buffer   if max_len - buffer < L <= max_len
        -penalty                            if L > max_len

    ``lengths`` any shape (completion lengths in tokens); returns the same shape."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float)
    soft = max_len - buffer
    ramp = (soft - lengths.float()) / buffer * penalty
    out = torch.where(lengths.float() <= soft, torch.zeros_like(ramp), ramp)
    return torch.where(lengths.float() > max_len, torch.full_like(ramp, -penalty), out)
