"""Online-RL tasks: prompt-only rows with ground-truth columns, and their held-out splits.

- ``task:countdown``  reach a target with + - * / using each given number once (TinyZero's
  task), generated here: 3 small numbers by default, so thousands of rows take milliseconds
  (reasoning-gym's own countdown takes minutes for 10k rows; see FIELD-NOTES).
- ``rg:NAME`` / ``task:rg:task=NAME``  any reasoning-gym task, scored by its own scorer.
- ``task:toy_code``  write a small Python function; a ``tests`` column for the code reward.

Splits are disjoint: countdown by a hash of the instance, toy_code by function, reasoning-gym
by seed (train rows whose question also appears in the test split are dropped).
"""

from __future__ import annotations

import hashlib
import operator
import random
from typing import Any

from posttrain.errors import DataError
from posttrain.tasks.registry import register_task

ANSWER_HINT = "Give your final answer inside <answer></answer>."


def _is_test(key: str) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10 == 0


# ---------------------------------------------------------------------------------- countdown

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _countdown_instance(rng: random.Random, count: int, max_number: int,
                        max_target: int) -> tuple[list[int], int, str] | None:
    nums = [rng.randint(1, max_number) for _ in range(count)]
    order = nums[:]
    rng.shuffle(order)
    expr, value = str(order[0]), order[0]
    for x in order[1:]:
        op = rng.choice("+-*")
        expr, value = f"({expr} {op} {x})", _OPS[op](value, x)
    if not 0 < value <= max_target:
        return None
    return nums, value, expr[1:-1] if expr.startswith("(") else expr


@register_task("countdown", "reach a target number with + - * / using each number once")
def countdown(split: str = "train", size: int | None = None, seed: int = 0, count: int = 3,
              max_number: int = 20, max_target: int = 100) -> list[dict[str, Any]]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    rng = random.Random(f"countdown-{seed}")
    rows: list[dict[str, Any]] = []
    want = size or 500
    for _ in range(want * 200):
        inst = _countdown_instance(rng, count, max_number, max_target)
        if inst is None:
            continue
        nums, target, solution = inst
        if _is_test(f"{sorted(nums)}-{target}") != (split == "test"):
            continue
        q = (f"Using the numbers {nums}, write an expression that equals {target}. Use each "
             f"number exactly once, with + - * / and parentheses. {ANSWER_HINT}")
        rows.append({"prompt": [{"role": "user", "content": q}], "numbers": nums,
                     "target": target, "solution": solution})
        if len(rows) == want:
            break
    return rows


# ------------------------------------------------------------------------------ reasoning-gym

def rg_rows(name: str, split: str = "train", size: int | None = None, seed: int = 0,
            demonstrate: bool = False, **config: Any) -> list[dict[str, Any]]:
    """Rows of reasoning-gym task ``name``: prompt, ``answer`` and the scorer's ``rg_entry``.

    The test split uses another seed; train rows whose question is in the test split of the
    same size are dropped, so the splits are disjoint. ``demonstrate``: each row also gets a
    ``completion``, the answer in the format the prompt asks for, so the rows are SFT data
    (it teaches the format and the answers, not the reasoning). Other keys go to
    reasoning-gym's task config.
    """
    import reasoning_gym

    size = size or 500

    def make(s: int) -> list[dict[str, Any]]:
        try:
            ds = reasoning_gym.create_dataset(name, size=size, seed=s, **config)
        except Exception as e:  # unknown task or bad config: say which
            raise DataError(f"rg:{name}: cannot create the reasoning-gym dataset ({e})") from None
        return [dict(ds[i]) for i in range(len(ds))]

    test = make(seed + 1_000_003)
    entries = test
    if split == "train":
        held = {e["question"] for e in test}
        entries = [e for e in make(seed) if e["question"] not in held]
    rows = [{"prompt": [{"role": "user", "content": f"{e['question'].strip()}\n{ANSWER_HINT}"}],
             "answer": str(e["answer"]), "rg_entry": e} for e in entries]
    if demonstrate:
        for row in rows:
            row["completion"] = [{"role": "assistant",
                                  "content": f"<answer>{row['answer']}</answer>"}]
    return rows


@register_task("rg", "any reasoning-gym task: task:rg:task=leg_counting (or data=rg:NAME)")
def rg_task(split: str = "train", size: int | None = None, seed: int = 0, task: str = "",
            demonstrate: bool = False, **config: Any) -> list[dict[str, Any]]:
    if not task:
        raise DataError("task:rg needs task=NAME, e.g. task:rg:task=leg_counting")
    return rg_rows(task, split, size, seed, demonstrate, **config)


# ----------------------------------------------------------------------------------- toy code

_TOY_FUNCTIONS = [
    ("add(a, b)", "returns the sum of a and b", "assert add(1, 2) == 3\nassert add(-4, 4) == 0"),
    ("square(x)", "returns x squared", "assert square(3) == 9\nassert square(-2) == 4"),
    ("is_even(n)", "returns True if n is even", "assert is_even(4)\nassert not is_even(7)"),
    ("reverse(s)", "returns the string s reversed",
     "assert reverse('abc') == 'cba'\nassert reverse('') == ''"),
    ("largest(xs)", "returns the largest number in the list xs",
     "assert largest([3, 9, 2]) == 9\nassert largest([-5, -1]) == -1"),
    ("count_a(s)", "returns how many times 'a' occurs in s",
     "assert count_a('banana') == 3\nassert count_a('xyz') == 0"),
    ("double(x)", "returns twice x", "assert double(4) == 8\nassert double(0) == 0"),
    ("first(xs)", "returns the first element of the list xs",
     "assert first([7, 8]) == 7\nassert first(['a']) == 'a'"),
    ("absolute(x)", "returns the absolute value of x",
     "assert absolute(-3) == 3\nassert absolute(2) == 2"),
    ("concat(a, b)", "returns the strings a and b joined",
     "assert concat('a', 'b') == 'ab'\nassert concat('', 'x') == 'x'"),
]


@register_task("toy_code", "write a small Python function; 'tests' column for the code reward")
def toy_code(split: str = "train", size: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    funcs = [f for i, f in enumerate(_TOY_FUNCTIONS) if (i % 5 == 4) == (split == "test")]
    rng = random.Random(f"toy_code-{split}-{seed}")
    rows = []
    for _ in range(size or len(funcs)):
        sig, what, tests = rng.choice(funcs)
        q = (f"Write a Python function `{sig}` that {what}. Reply with the code in a "
             "```python block.")
        rows.append({"prompt": [{"role": "user", "content": q}], "tests": tests})
    return rows
