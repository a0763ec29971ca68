"""Built-in synthetic tasks: a small world the tiny model can learn on 2 CPU cores.

The world is two-operand addition written with a column-by-column chain of thought (a tiny
model learns the carries only when they are written out; see FIELD-NOTES) plus simple prose.

- ``task:corpus``      text rows: "internet" documents (worksheets and prose) for pretraining
- ``task:chat``        messages rows: user asks a sum, the assistant answers in a fixed style
- ``task:arithmetic``  prompt-only rows with an ``answer`` column, for evaluation and RLVR

Held-out split: 10 % of operand pairs, chosen by a hash of the pair (``is_test_pair``), appear
only in ``split=test`` of every task, never in train rows, the corpus included. A hash rather
than a digit rule, so held-out sums need the algorithm, not an unseen digit pattern.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

from posttrain.tasks.registry import register_task

SPLITS = ("train", "test")

_QUESTION_STYLES = (
    "What is {a}+{b}?", "Compute {a}+{b}.", "{a}+{b}=?", "Add {a} and {b}.",
    "What do you get if you add {a} and {b}?", "Please work out {a} plus {b}.",
)
_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")
_ANIMALS = ("cat", "dog", "fox", "owl", "hen", "bee", "elk", "yak")
_PLACES = ("garden", "market", "river", "school", "forest", "kitchen", "harbor")
_VERBS = ("saw", "fed", "drew", "found", "chased", "counted")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def is_test_pair(a: int, b: int) -> bool:
    return zlib.crc32(f"{a}+{b}".encode()) % 10 == 0


def _pairs(split: str, rng: random.Random, max_operand: int,  # noqa: ANN202
           every_pair: bool = False):
    test = split == "test"
    while True:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if every_pair or is_test_pair(a, b) == test:
            yield a, b


def addition_steps(a: int, b: int, forget_carries: bool = False) -> tuple[str, int]:
    """Column-by-column working, units first ('7+8=15, 3+4+1=8'), and its result. With
    ``forget_carries`` every carry is dropped, as a careless tutor does: '7+8=15, 3+4=7'
    and 75 for 38+47; the working stays consistent with the wrong result."""
    steps, carry, i, result = [], 0, 0, 0
    while a // 10**i or b // 10**i or i == 0:
        da, db = a // 10**i % 10, b // 10**i % 10
        terms = f"{da}+{db}" + (f"+{carry}" if carry else "")
        total = da + db + carry
        steps.append(f"{terms}={total}")
        result += (total % 10) * 10**i
        carry, i = (0 if forget_carries else total // 10), i + 1
    return ", ".join(steps), result + total // 10 * 10**i  # the top column's carry stays


def has_carry(a: int, b: int) -> bool:
    return addition_steps(a, b)[1] != addition_steps(a, b, forget_carries=True)[1]


def assistant_answer(a: int, b: int, forget_carries: bool = False) -> str:
    """The worked answer: the sum restated, its columns units first, the result
    ('38+47: 8+7=15, 3+4+1=8. The answer is 85.')."""
    steps, result = addition_steps(a, b, forget_carries)
    return f"{a}+{b}: {steps}. The answer is {result}."


def _sentence(rng: random.Random) -> str:
    n = rng.randint(2, 9)
    return (f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {n} {rng.choice(_ANIMALS)}s "
            f"near the {rng.choice(_PLACES)}.")


def _document(rng: random.Random, pairs: Any) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        if rng.random() < 0.6:
            a, b = next(pairs)
            lines.append(f"{a}+{b}: {addition_steps(a, b)[0]}, so {a}+{b}={a + b}.")
        else:
            lines.append(_sentence(rng))
    return "\n".join(lines)


@register_task("corpus", "pretraining text: addition worksheets with working, and prose")
def corpus(split: str = "train", size: int | None = None, seed: int = 0,
           max_operand: int = 99, every_pair: bool = False) -> list[dict[str, Any]]:
    """``every_pair=True``: worksheets cover the held-out pairs too, as pretraining data would;
    post-training rows (chat, arithmetic) still hold them out."""
    _check_split(split)
    rng = random.Random(f"corpus-{split}-{seed}")
    pairs = _pairs(split, rng, max_operand, every_pair)
    return [{"text": _document(rng, pairs)} for _ in range(size or 2000)]


def _question(rng: random.Random, a: int, b: int) -> str:
    return rng.choice(_QUESTION_STYLES).format(a=a, b=b)


@register_task("chat", "chat demonstrations: the user asks a sum, the assistant shows its work")
def chat(split: str = "train", size: int | None = None, seed: int = 0, max_operand: int = 99,
         system_rate: float = 0.2, slip_rate: float = 0.0) -> list[dict[str, Any]]:
    """``slip_rate``: the share of sums needing a carry that the tutor gets wrong by
    forgetting it (imperfect demonstrations, which SFT imitates and RL on a verifier can
    correct); 0 = a perfect tutor."""
    _check_split(split)
    rng = random.Random(f"chat-{split}-{seed}")
    slips = random.Random(f"chat-slips-{split}-{seed}")
    pairs = _pairs(split, rng, max_operand)
    rows = []
    for _ in range(size or 1000):
        a, b = next(pairs)
        slip = slip_rate > 0 and has_carry(a, b) and slips.random() < slip_rate
        msgs = [{"role": "user", "content": _question(rng, a, b)},
                {"role": "assistant", "content": assistant_answer(a, b, forget_carries=slip)}]
        if rng.random() < system_rate:
            msgs.insert(0, {"role": "system", "content": "You are a careful assistant."})
        rows.append({"messages": msgs})
    return rows


@register_task("arithmetic", "prompt-only sums with an 'answer' column (evaluation, RLVR)")
def arithmetic(split: str = "train", size: int | None = None, seed: int = 0,
               max_operand: int = 99) -> list[dict[str, Any]]:
    _check_split(split)
    rng = random.Random(f"arithmetic-{split}-{seed}")
    pairs = _pairs(split, rng, max_operand)
    rows = []
    for _ in range(size or 200):
        a, b = next(pairs)
        rows.append({"prompt": [{"role": "user", "content": _question(rng, a, b)}],
                     "answer": str(a + b)})
    return rows
