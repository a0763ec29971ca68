"""AI judges: which of two answers better follows a principle (RLAIF, seed §5.8).

A judge maps comparisons to P(the first answer is better). These implementations share that
protocol:

    ModelJudge     a local HF model, asked "... Answer with A or B." and read from the
                   probability of its next token: P(A) = softmax(logit_A, logit_B)[0]
                   (not by parsing free text, which a small model gets wrong in many ways)
    RatingJudge    a local HF model asked the principle's yes/no ``rubric`` about one answer
                   ("... Answer with Yes or No."), s = P(Yes) = softmax(logit_Yes,
                   logit_No)[0]; two answers compare by Bradley-Terry on the ratings'
                   log-odds, P(first) = sigmoid(logit s1 - logit s2). One answer per question
                   is a shorter task with no slot to prefer (no position bias by
                   construction), which a small judge learns sooner (docs/cai.md)
    CallableJudge  any Python function ``(prompt, first, second, question) -> P(first)``
    HttpJudge      any OpenAI-compatible chat endpoint (``posttrain serve``, vLLM, a hosted
                   API): the reply's first letter, A or B, gives P = 1 or 0; retries with
                   backoff, a timeout and a concurrency limit; a reply that is neither, or a
                   request that keeps failing, is a counted failure (P = 1/2, so the pair is
                   dropped as a tie), never a label

Position bias: models prefer an answer for the slot it is in. ``judge_pairs`` asks every
comparison in both orders and averages, p = (P(a first) + 1 - P(b first)) / 2; when the two
orders disagree on the winner (one says a, the other b), the verdict is order-inconsistent
and the pair is dropped, as is a tie (|p - 1/2| < ``min_margin``). A judge that always
prefers the first slot therefore yields only dropped pairs, never a label.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from posttrain.errors import ConfigError

JUDGE_TEMPLATE = (
    "{question}\n\nRequest: {prompt}\n\nAnswer A: {first}\n\nAnswer B: {second}\n\n"
    "Answer with A or B.")
RATE_TEMPLATE = "{rubric}\n\nRequest: {prompt}\n\nAnswer: {answer}\n\nAnswer with Yes or No."
JUDGE_MODES = ("compare", "rate")  # ModelJudge, RatingJudge


@dataclass(frozen=True)
class Comparison:
    prompt: str
    first: str
    second: str
    question: str  # the principle's judge question
    rubric: str = ""  # its yes/no rubric (rating judges; the question when empty)


class Judge(Protocol):
    def prefer_first(self, items: Sequence[Comparison]) -> list[float]:
        """P(first answer is better), one per comparison."""
        ...


@dataclass(frozen=True)
class Verdict:
    """``p_a``: the order-averaged probability that answer a is better; ``kept`` is False for
    ties and order-inconsistent verdicts (``why`` says which)."""

    p_a: float
    p_a_first: float
    p_a_second: float
    kept: bool
    why: str = ""

    @property
    def a_wins(self) -> bool:
        return self.p_a > 0.5


class CallableJudge:
    """A Python function as a judge."""

    def __init__(self, fn: Callable[[str, str, str, str], float]) -> None:
        self.fn = fn

    def prefer_first(self, items: Sequence[Comparison]) -> list[float]:
        return [float(self.fn(c.prompt, c.first, c.second, c.question)) for c in items]


class ModelJudge:
    """A local causal LM judging by its next-token probabilities of "A" and "B"."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16,
                 template: str = JUDGE_TEMPLATE) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.template = batch_size, template
        self.choice_ids = (_single_token(tokenizer, "A"), _single_token(tokenizer, "B"))

    @torch.no_grad()
    def prefer_first(self, items: Sequence[Comparison]) -> list[float]:
        from posttrain.data.chat import render_prompt

        out: list[float] = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s : s + self.batch_size]
            ids = [render_prompt(self.tokenizer, [{"role": "user", "content": self.template.format(
                question=c.question, prompt=c.prompt, first=c.first, second=c.second)}])
                for c in chunk]
            out += self._p_first(ids)
        return out

    def _p_first(self, ids: list[list[int]]) -> list[float]:
        return _p_choice(self.model, self.tokenizer, ids, self.choice_ids)


class RatingJudge:
    """A local causal LM rating one answer at a time by its next-token probabilities of "Yes"
    and "No" (the first token of each) after the principle's rubric; see the module doc."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16,
                 template: str = RATE_TEMPLATE, choices: tuple[str, str] = ("Yes", "No")) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.template = batch_size, template
        yes, no = (tokenizer.encode(w, add_special_tokens=False)[:1] for w in choices)
        if not yes or yes == no:
            raise ValueError(f"the rating judge needs {choices[0]!r} and {choices[1]!r} to "
                             "start with different tokens in this tokenizer")
        self.choice_ids = (yes[0], no[0])
        self._last: dict[tuple[str, str, str], float] = {}  # judge_pairs asks each answer twice

    def prefer_first(self, items: Sequence[Comparison]) -> list[float]:
        keys = [((c.rubric or c.question), c.prompt, a) for c in items for a in (c.first, c.second)]
        ratings = self.rate(keys)
        return [_bradley_terry(ratings[2 * i], ratings[2 * i + 1]) for i in range(len(items))]

    @torch.no_grad()
    def rate(self, keys: Sequence[tuple[str, str, str]]) -> list[float]:
        """P(Yes) for each (rubric, prompt, answer)."""
        from posttrain.data.chat import render_prompt

        known = {k: self._last[k] for k in keys if k in self._last}
        todo = list(dict.fromkeys(k for k in keys if k not in known))
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s : s + self.batch_size]
            ids = [render_prompt(self.tokenizer, [{"role": "user", "content": self.template.format(
                rubric=r, prompt=p, answer=a)}]) for r, p, a in chunk]
            known.update(zip(chunk, _p_choice(self.model, self.tokenizer, ids, self.choice_ids),
                             strict=True))
        self._last = known
        return [known[k] for k in keys]


def model_judge(model: Any, tokenizer: Any, mode: str = "compare") -> ModelJudge | RatingJudge:
    """The local-model judge of ``mode``: compare (A or B) or rate (yes/no per answer)."""
    _check_mode(mode, "judge mode")
    return ModelJudge(model, tokenizer) if mode == "compare" else RatingJudge(model, tokenizer)


def _check_mode(mode: str, what: str) -> None:
    if mode not in JUDGE_MODES:
        raise ConfigError(f"{what} must be one of {', '.join(JUDGE_MODES)}, got {mode!r}")


def _bradley_terry(s_first: float, s_second: float, eps: float = 1e-6) -> float:
    """P(first better) from two P(Yes) ratings: sigmoid of the difference of their log-odds."""
    import math

    def logit(s: float) -> float:
        s = min(max(s, eps), 1 - eps)
        return math.log(s / (1 - s))

    return 1.0 / (1.0 + math.exp(logit(s_second) - logit(s_first)))


def _p_choice(model: Any, tokenizer: Any, ids: list[list[int]],
              choice_ids: tuple[int, int]) -> list[float]:
    """softmax over the two choice tokens at each prompt's next position: P(the first)."""
    device = next(model.parameters()).device
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id or 0
    # left padding: every row's next token is at the last position
    x = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=x, attention_mask=mask, position_ids=pos).logits[:, -1]
    two = logits[:, list(choice_ids)].float()
    return torch.softmax(two, dim=-1)[:, 0].tolist()


class HttpJudge:
    """A judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None,
                 timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5,
                 concurrency: int = 4, template: str = JUDGE_TEMPLATE) -> None:
        import os

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.template = model, template
        self.key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.concurrency = concurrency
        self.failures: dict[str, int] = {}  # by kind: unreachable, timeout, http_NNN, malformed

    def prefer_first(self, items: Sequence[Comparison]) -> list[float]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, items))

    def _one(self, c: Comparison) -> float:
        import time

        body = {"model": self.model, "max_tokens": 1, "temperature": 0.0, "messages": [
            {"role": "user", "content": self.template.format(
                question=c.question, prompt=c.prompt, first=c.first, second=c.second)}]}
        for attempt in range(self.retries + 1):
            kind, reply = self._post(body)
            if kind is None:
                letter = reply.strip()[:1].upper()
                if letter in ("A", "B"):
                    return 1.0 if letter == "A" else 0.0
                kind = "malformed"
            self._count(kind)
            if kind.startswith("http_4") or attempt == self.retries:
                break
            time.sleep(self.backoff_s * 2**attempt)
        return 0.5  # no verdict: the pair is dropped as a tie, never mislabelled

    def _post(self, body: dict[str, Any]) -> tuple[str | None, str]:
        import json
        import logging
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                reply = json.loads(r.read())["choices"][0]["message"]["content"]
                return None, str(reply or "")
        except urllib.error.HTTPError as e:
            kind = f"http_{e.code}"
        except TimeoutError:
            kind = "timeout"
        except urllib.error.URLError as e:
            kind = "timeout" if isinstance(e.reason, TimeoutError) else "unreachable"
        except (ValueError, KeyError, IndexError, TypeError):
            kind = "malformed"
        logging.getLogger("posttrain").warning("judge %s: %s", self.url, kind)
        return kind, ""

    def _count(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


class LazyJudge:
    """The judge named by ``spec``: ``package.module:function`` (a ``CallableJudge``, imported
    at once so a typo fails before any model loads) or a model directory (a ``ModelJudge``,
    loaded on first use; ``fallback`` = an already loaded (model, tokenizer) used when
    ``spec`` is empty)."""

    def __init__(self, spec: str | None, what: str,
                 fallback: Callable[[], tuple[Any, Any]] | None = None,
                 mode: str = "compare") -> None:
        if not spec and fallback is None:
            raise ConfigError(f"{what} is required (a model dir or package.module:function)")
        _check_mode(mode, f"{what}: judge mode")
        self.spec, self.fallback, self.mode = spec, fallback, mode
        self.judge: Judge | None = None
        if spec and ":" in spec and not Path(spec).exists():
            module, _, name = spec.partition(":")
            try:
                fn = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as e:
                raise ConfigError(f"{what}={spec}: cannot import it ({e})") from None
            self.judge = CallableJudge(fn)

    def _loaded(self) -> Judge:
        if self.judge is None:
            if self.spec:
                from posttrain.models.io import load_model, load_tokenizer

                self.judge = model_judge(load_model(self.spec), load_tokenizer(self.spec),
                                         self.mode)
            else:
                self.judge = model_judge(*self.fallback(), self.mode)  # type: ignore[misc]
        return self.judge

    def prefer_first(self, items: Sequence[Comparison]) -> list[float]:
        return self._loaded().prefer_first(items)

    def rate(self, keys: Sequence[tuple[str, str, str]]) -> list[float]:
        """P(Yes) per (rubric, prompt, answer): rating judges only."""
        judge = self._loaded()
        if not isinstance(judge, RatingJudge):
            raise ConfigError(f"{self.spec or 'the judge'} rates no single answer: use a model "
                              "judge with judge mode 'rate'")
        return judge.rate(keys)


def _single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the judge's choice {text!r} is not one token for this tokenizer")
    return ids[0]


def judge_pairs(judge: Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str],
                questions: Sequence[str], min_margin: float = 0.0,
                rubrics: Sequence[str] | None = None) -> list[Verdict]:
    """Both orders of each (prompt, a, b) comparison; see the module doc for what is kept.
    ``rubrics``: the principles' yes/no rubrics, for rating judges."""
    rubrics = rubrics if rubrics is not None else [""] * len(prompts)
    rows = list(zip(prompts, a, b, questions, rubrics, strict=True))
    fwd = judge.prefer_first([Comparison(p, x, y, q, r) for p, x, y, q, r in rows])
    rev = judge.prefer_first([Comparison(p, y, x, q, r) for p, x, y, q, r in rows])
    return [_verdict(f, 1.0 - r, min_margin) for f, r in zip(fwd, rev, strict=True)]


def _verdict(p_a_first: float, p_a_second: float, min_margin: float) -> Verdict:
    p = (p_a_first + p_a_second) / 2
    if (p_a_first - 0.5) * (p_a_second - 0.5) < 0:
        return Verdict(p, p_a_first, p_a_second, False, "order-inconsistent")
    if abs(p - 0.5) <= min_margin or p == 0.5:
        return Verdict(p, p_a_first, p_a_second, False, "tie")
    return Verdict(p, p_a_first, p_a_second, True)
