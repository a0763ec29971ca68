"""Verifiers: deterministic checks of a completion against ground truth (DESIGN.md §2).

A verifier is ``verify(completion, truth) -> (score, reason)``; ``VerifierReward`` turns one
into a RewardFn reading the truth from a dataset column, and ``rlvr_reward`` composes seed
EQ 5.7:  ``r(x, y) = 1[verify(x, y)] + lambda_fmt * 1[format ok]``.

Every verifier first narrows the completion to its answer: the text of the last
``<answer>...</answer>`` block when there is one, else the whole completion.
"""

from __future__ import annotations

import ast
import logging
import math
import re
from collections.abc import Sequence
from typing import Any, Protocol

from posttrain.rewards.base import RewardSet

log = logging.getLogger("posttrain")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
THINK_ANSWER = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


class Verifier(Protocol):
    name: str

    def verify(self, completion: str, truth: Any) -> tuple[float, str]: ...


def answer_text(completion: str) -> str:
    """The last ``<answer>`` block's content, else the completion, stripped."""
    found = _ANSWER.findall(completion)
    return (found[-1] if found else completion).strip()


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


class ExactMatch:
    """1 if the answer equals the truth (after stripping; ``case_sensitive`` optional)."""

    name = "exact"

    def __init__(self, case_sensitive: bool = False):
        self.case_sensitive = case_sensitive

    def verify(self, completion: str, truth: Any) -> tuple[float, str]:
        a, t = answer_text(completion), str(truth).strip()
        if not self.case_sensitive:
            a, t = a.lower(), t.lower()
        return (1.0, "exact match") if a == t else (0.0, f"{a[:40]!r} != {t[:40]!r}")


class NumericMatch:
    """1 if the answer's last number is within ``abs_tol`` or ``rel_tol`` of the truth."""

    name = "numeric"

    def __init__(self, rel_tol: float = 1e-6, abs_tol: float = 1e-9):
        self.rel_tol, self.abs_tol = rel_tol, abs_tol

    def verify(self, completion: str, truth: Any) -> tuple[float, str]:
        got = last_number(answer_text(completion))
        want = float(truth) if not isinstance(truth, str) else last_number(truth)
        if got is None or want is None:
            return 0.0, "no number" if got is None else "truth is not a number"
        ok = math.isclose(got, want, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return (1.0, "numeric match") if ok else (0.0, f"{got:g} != {want:g}")


class MathVerify:
    """Symbolic equivalence with the ``math-verify`` package (LaTeX, \\boxed{}, expressions).

    math-verify's own timeouts use ``signal.alarm``, which raises off the main thread (and
    rewards run in a worker thread, see ``RewardSet``), so they are switched off here and the
    wall-clock bound is ``RewardSet``'s per-call timeout instead.
    """

    name = "math"

    def __init__(self) -> None:
        # It warns on every call that its timeouts are off; we own the timeout (see above).
        for mod in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(mod).setLevel(logging.ERROR)

    def verify(self, completion: str, truth: Any) -> tuple[float, str]:
        from math_verify import parse, verify

        gold = parse(str(truth) if "$" in str(truth) or "\\" in str(truth)
                     else f"${truth}$", parsing_timeout=None)
        pred = parse(answer_text(completion), parsing_timeout=None)
        if not pred:
            return 0.0, "no parsable answer"
        ok = verify(gold, pred, timeout_seconds=None)
        return (1.0, "equivalent") if ok else (0.0, f"{pred[-1]} not equivalent")


class RegexFormat:
    """1 if the whole completion matches ``pattern`` (default: ``<think>…</think>`` then
    ``<answer>…</answer>``, DeepSeek-R1's format). Ignores the truth."""

    name = "format"

    def __init__(self, pattern: str = THINK_ANSWER):
        self.pattern = re.compile(pattern, re.S)

    def verify(self, completion: str, truth: Any = None) -> tuple[float, str]:
        ok = self.pattern.search(completion) is not None
        return (1.0, "format ok") if ok else (0.0, "format mismatch")


class ReasoningGymScore:
    """A reasoning-gym task's own scorer; the truth is the dataset entry (``rg_entry``)."""

    name = "rg"

    def verify(self, completion: str, truth: Any) -> tuple[float, str]:
        import reasoning_gym

        entry = dict(truth)
        score_fn = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
        score = float(score_fn(answer_text(completion), entry))
        return score, f"reasoning-gym score {score:g}"


_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult,
            ast.Div, ast.USub)


def _eval_arith(expr: str) -> tuple[float, list[int]]:
    """Value of an arithmetic expression and the integer literals it uses; ValueError if it
    is anything but numbers, + - * / and parentheses."""
    tree = ast.parse(expr, mode="eval")
    literals: list[int] = []
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ValueError(f"not allowed in an expression: {type(node).__name__}")
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, int):
                raise ValueError("only integer literals")
            literals.append(node.value)
    return float(eval(compile(tree, "<expr>", "eval"), {"__builtins__": {}})), literals


class CountdownCheck:
    """Verifier: the answer is an expression using exactly the row's numbers that equals the
    target. Truth: ``{"numbers": [...], "target": int}``."""

    name = "countdown"

    def verify(self, completion: str, truth: Any) -> tuple[float, str]:
        expr = answer_text(completion).split("=")[0].strip()
        try:
            value, used = _eval_arith(expr)
        except (SyntaxError, ValueError, ZeroDivisionError, TypeError) as e:
            return 0.0, f"bad expression ({type(e).__name__})"
        if sorted(used) != sorted(truth["numbers"]):
            return 0.0, f"uses {sorted(used)}, not {sorted(truth['numbers'])}"
        if abs(value - truth["target"]) > 1e-6:
            return 0.0, f"= {value:g}, not {truth['target']}"
        return 1.0, "reaches the target"


class VerifierReward:
    """RewardFn from a Verifier: the truth of row i is ``columns[column][i]`` (None -> not
    applicable). A verifier that raises on one row scores that row ``on_error`` and is
    counted in ``last_stats`` (``verify/<name>/errors``), without failing the batch."""

    def __init__(self, verifier: Any, column: str | tuple[str, ...] | None = "answer",
                 on_error: float = 0.0, name: str | None = None):
        self.verifier, self.column, self.on_error = verifier, column, on_error
        self.__name__ = name or verifier.name
        self.last_stats: dict[str, float] = {}
        self.last_reasons: list[str] = []

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 **columns: Any) -> list[float | None]:
        truths = self._truths(len(completions), columns)
        out: list[float | None] = []
        errors = 0
        self.last_reasons = []
        for completion, truth in zip(completions, truths, strict=True):
            if self.column is not None and truth is None:
                out.append(None)
                self.last_reasons.append("not applicable")
                continue
            try:
                score, reason = self.verifier.verify(completion, truth)
            except Exception as e:  # one bad row must not zero the batch
                errors += 1
                score, reason = self.on_error, f"error: {e!r}"
            out.append(score)
            self.last_reasons.append(reason)
        if errors:
            log.warning("verifier %s raised on %d rows", self.__name__, errors)
        self.last_stats = {f"verify/{self.__name__}/errors": float(errors)}
        return out

    def _truths(self, n: int, columns: dict[str, Any]) -> Sequence[Any]:
        """Row i's truth: one column's value, or a dict of several columns' values (None when
        all of them are: a row of a mixture's other task)."""
        if self.column is None:
            return [None] * n
        names = (self.column,) if isinstance(self.column, str) else self.column
        missing = [c for c in names if c not in columns]
        if missing:
            raise KeyError(f"reward {self.__name__} needs column(s) {missing}; the data has "
                           f"{sorted(columns)}")
        if isinstance(self.column, str):
            return columns[self.column]
        return [None if all(v is None for v in vals) else dict(zip(names, vals, strict=True))
                for vals in zip(*(columns[c] for c in names), strict=True)]


def rlvr_reward(verifier: Any, *, column: str = "answer", lambda_fmt: float = 0.2,
                format_pattern: str = THINK_ANSWER, timeout_s: float | None = 60.0) -> RewardSet:
    """Seed EQ 5.7: ``1[verify] + lambda_fmt * 1[format ok]`` as a two-function RewardSet."""
    return RewardSet([VerifierReward(verifier, column), VerifierReward(
        RegexFormat(format_pattern), None)], [1.0, lambda_fmt], timeout_s=timeout_s)
