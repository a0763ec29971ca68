"""``reward.*``: the reward of an online recipe, a weighted sum of a reward model's score and
reward functions (DESIGN.md §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from posttrain.config.checks import Needs
from posttrain.errors import ConfigError


@dataclass
class RewardConfig:
    """The reward: a reward model's score and/or reward functions, weighted and summed."""

    RANGES: ClassVar[dict[str, str]] = {"timeout_s": ">= 0", "on_error": "finite"}
    ONLY_WITH: ClassVar[dict[str, Needs]] = {
        "judge_model": Needs("functions", ("judge",)),
        "judge_question": Needs("functions", ("judge",)),
        "judge_mode": Needs("functions", ("judge",)),
    }

    model: str | None = field(
        default=None, metadata={"help": "reward model dir (posttrain rm's final/); its score "
                                        "is the first reward"})
    functions: list[str] = field(
        default_factory=list, metadata={"help": "reward functions (docs/rewards.md); auto = the "
                                                "verifier that fits the data"})
    weights: list[float] = field(
        default_factory=list, metadata={"help": "one weight per reward: [model (if set), "
                                                "*functions]; [] = all 1"})
    judge_model: str | None = field(default=None, metadata={
        "help": "functions=[judge]: the judge, a model dir or package.module:function "
                "(docs/cai.md)"})
    judge_question: str = field(default="Which answer is better?", metadata={
        "help": "functions=[judge]: the question the judge answers (a principle's judge; "
                "with judge_mode=rate a yes/no rubric)"})
    judge_mode: Literal["compare", "rate"] = field(default="compare", metadata={
        "help": "functions=[judge]: compare = against the row's reference (both orders); "
                "rate = P(Yes) of the rubric about the completion alone (no reference)"})
    timeout_s: float = field(default=60.0, metadata={"help": "per reward call; 0 = none"})
    on_error: float = field(
        default=0.0, metadata={"help": "score of rows whose reward call raised or timed out"})

    @property
    def count(self) -> int:
        return len(self.functions) + (self.model is not None)

    def validate(self) -> None:
        if self.weights and len(self.weights) != self.count:
            raise ConfigError(f"{self.count} rewards (reward.model counts as the first) but "
                              f"{len(self.weights)} reward.weights")
        # Negative weights are fine (a penalty); NaN or all zeros make the reward meaningless.
        if any(not math.isfinite(w) for w in self.weights):
            raise ConfigError(f"reward.weights must be finite numbers, got {self.weights}")
        if self.weights and not any(self.weights):
            raise ConfigError(f"reward.weights are all 0, got {self.weights}: the reward would "
                              "be constant and nothing would be learned")
