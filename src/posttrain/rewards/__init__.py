"""Reward functions, verifiers and their composition (DESIGN.md §2; docs/rewards.md)."""

from posttrain.rewards.base import RewardFn, RewardOutput, RewardSet, call_with_timeout
from posttrain.rewards.verifiers import (
    ExactMatch,
    MathVerify,
    NumericMatch,
    ReasoningGymScore,
    RegexFormat,
    Verifier,
    VerifierReward,
    rlvr_reward,
)

__all__ = [
    "ExactMatch", "MathVerify", "NumericMatch", "ReasoningGymScore", "RegexFormat", "RewardFn",
    "RewardOutput", "RewardSet", "Verifier", "VerifierReward", "call_with_timeout", "rlvr_reward",
]
