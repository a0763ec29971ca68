"""Rewards of rollouts: decode the completions, pair each with its prompt row, call the set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from posttrain.data.prompts import Row, truth_columns
from posttrain.rewards.base import RewardOutput, RewardSet
from posttrain.rollout.protocol import Rollouts


def score_rollouts(rewards: RewardSet, tokenizer: Any, rows: Sequence[Row],
                   ro: Rollouts) -> tuple[RewardOutput, list[str]]:
    """Rewards of every completion of ``ro`` (row ``ro.prompt_of(k)`` is completion ``k``'s
    prompt row, its truth columns the RewardFn's ``**columns``), and the decoded texts."""
    texts = tokenizer.batch_decode(ro.completion_ids, skip_special_tokens=True)
    expanded = [rows[ro.prompt_of(k)] for k in range(len(ro))]
    out = rewards([r["prompt"] for r in expanded], texts, **truth_columns(expanded))
    return out, texts


def pass_rate(out: RewardOutput, names: Sequence[str]) -> tuple[float, int]:
    """(pass rate, completions scored): each completion is judged by the first verifier of
    ``names`` that applies to its row (the others are NaN there: a mixture's other kinds of
    row) and passes when that reward is >= 1; completions none applies to are left out, so
    one task's verifier does not count the other tasks' rows as failures."""
    verdict = torch.full_like(out.total, float("nan"))
    for name in reversed(names):
        value = out.per_fn[name]
        verdict = torch.where(value.isnan(), verdict, value)
    scored = verdict[~verdict.isnan()]
    if not len(scored):
        return float("nan"), 0
    return float((scored >= 1.0).float().mean()), len(scored)


def no_eos_frac(ro: Rollouts) -> float:
    """Fraction of completions cut at the token budget without ending their turn."""
    return sum(r == "length" for r in ro.finish_reasons) / len(ro)


def lengths(ro: Rollouts) -> torch.Tensor:
    """Completion lengths (S,) in tokens, float."""
    return torch.tensor([len(c) for c in ro.completion_ids], dtype=torch.float)
