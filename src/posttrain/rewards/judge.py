"""An AI judge as a reward (RLAIF for GRPO and PPO; ``cai/judge.py``).

``rewards=[judge]`` scores each completion against the row's ``reference`` answer: the reward
is the judge's order-averaged probability that the completion is the better of the two,
p = (P(completion shown first wins) + 1 - P(reference shown first wins)) / 2, in [0, 1].
Asking both orders cancels the judge's position bias, as when labelling preferences.
The judge is ``reward.judge_model`` (a model directory, or ``package.module:function`` with
``CallableJudge``'s signature) and its question ``reward.judge_question``.

With ``reward.judge_mode=rate`` the judge is a ``RatingJudge`` and ``judge_question`` a yes/no
rubric: the reward is P(Yes) for the completion alone, so rows need no ``reference``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class JudgeReward:
    """RewardFn: the judge's P(completion better than the row's ``reference``)."""

    __name__ = "judge"
    required_columns = ("reference",)

    def __init__(self, judge_model: str | None, question: str, mode: str = "compare") -> None:
        from posttrain.cai.judge import LazyJudge

        self.question, self.mode = question, mode
        self.judge = LazyJudge(judge_model, "reward.judge_model", mode=mode)
        if mode == "rate":
            self.required_columns = ()

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 reference: Sequence[Any] = (), **_: Any) -> list[float | None]:
        from posttrain.cai.judge import judge_pairs
        from posttrain.data.chat import last_text

        texts = [last_text(p) for p in prompts]
        if self.mode == "rate":
            return list(self.judge.rate([(self.question, t, c)
                                         for t, c in zip(texts, completions, strict=True)]))
        refs = [last_text(r) if isinstance(r, str | list) else str(r) for r in reference]
        verdicts = judge_pairs(self.judge, texts, list(completions), refs,
                               [self.question] * len(texts))
        return [v.p_a for v in verdicts]

