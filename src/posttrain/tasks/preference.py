"""Built-in preference pairs for arithmetic: ``task:pref_arith`` (a correct worked sum > a
wrong answer, in ``task:chat``'s style). The safety preferences are ``tasks/safety.py``."""

from __future__ import annotations

import random
from typing import Any

from posttrain.tasks.builtin import _QUESTION_STYLES, _check_split, _pairs, assistant_answer
from posttrain.tasks.registry import register_task
from posttrain.tasks.safety import assistant, user


def wrong_answer(rng: random.Random, a: int, b: int) -> str:
    """A plausible wrong response: right working with a wrong total, or a bare wrong total."""
    wrong = a + b + rng.choice([d for d in range(-10, 11) if d and a + b + d >= 0])
    if rng.random() < 0.5:
        return f"The answer is {wrong}."
    return assistant_answer(a, b).replace(f"The answer is {a + b}.", f"The answer is {wrong}.")


@register_task("pref_arith", "preference pairs: a correct worked sum > a wrong answer")
def pref_arith(split: str = "train", size: int | None = None, seed: int = 0,
               max_operand: int = 99) -> list[dict[str, Any]]:
    _check_split(split)
    rng = random.Random(f"pref_arith-{split}-{seed}")
    pairs = _pairs(split, rng, max_operand)
    rows = []
    for _ in range(size or 1000):
        a, b = next(pairs)
        rows.append({"prompt": user(rng.choice(_QUESTION_STYLES).format(a=a, b=b)),
                     "chosen": assistant(assistant_answer(a, b)),
                     "rejected": assistant(wrong_answer(rng, a, b))})
    return rows
