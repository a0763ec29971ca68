"""The demo's safety tasks (the world they draw from: ``tasks/safety_world.py``).

Every request is a *frame* ("Can you give me the {x} of {o}?") around a *thing* and a place.
The thing alone decides: a secret (a password, a PIN, a door code...) must be refused; public
information (opening hours, the address...) has one helpful answer. Harmful and benign
requests share every frame, so a model can only tell them apart by the thing asked for.
Sums asked in chat are benign too.

Held out (``split=test``): three frames never seen in training, plus a share of the
(frame, thing, place) combinations of the others: held-out prompts are new phrasings and new
combinations, never repeats. The "harm" is a stand-in (revealing a made-up code).

- ``task:safety_chat``     SFT demonstrations: sums (``task:chat``) and safety turns, written
                           by an over-cautious annotator who refuses ``caution`` of the
                           harmless requests too; optionally (``cai_frac``, ``judge_frac``)
                           the skills Constitutional AI asks of a model: critiquing and
                           revising an answer against the demo constitution when asked, and
                           judging which of two answers follows a principle
- ``task:safety_pairs``    preference pairs: refusal > compliance for secrets, helpful answer >
                           refusal for harmless requests and sums
- ``task:safety_prompts``  prompt-only rows: ``kind`` harmful | info | sum, ``harmful``,
                           ``answer`` (the helpful answer; None for harmful requests; also
                           as ``expected``, what a safety suite scores benign answers by) and
                           ``category`` (request | sum: which principles of the demo
                           constitution apply; it does not say whether a request is harmful)
"""

from __future__ import annotations

import random
from typing import Any

from posttrain.tasks.builtin import _QUESTION_STYLES, _check_split, _pairs, assistant_answer, chat
from posttrain.tasks.registry import register_task
from posttrain.tasks.safety_world import (
    FRAMES,
    HELD_OUT_FRAMES,
    INFO,
    PLACES,
    REFUSAL,
    SECRETS,
    assistant,
    compliance,
    harmful_requests,
    info_requests,
    user,
)

# The world's names, for the modules and tests that build on the tasks.
__all__ = ["FRAMES", "HELD_OUT_FRAMES", "INFO", "PLACES", "REFUSAL", "SECRETS", "assistant",
           "compliance", "harmful_requests", "info_requests", "safety_chat", "safety_pairs",
           "safety_prompts", "user"]


@register_task("safety_chat", "SFT demonstrations: sums, refusals of requests for secrets, "
               "answers to harmless requests (some over-cautiously refused)")
def safety_chat(split: str = "train", size: int | None = None, seed: int = 0,
                safety_frac: float = 0.35, caution: float = 0.5, max_operand: int = 99,
                slip_rate: float = 0.0, cai_frac: float = 0.0, judge_frac: float = 0.0,
                rate_frac: float = 0.0, rate_sum_frac: float = 0.25,
                rate_garble_frac: float = 0.0) -> list[dict[str, Any]]:
    """``task:chat`` rows (``slip_rate``: see there) with ``safety_frac`` of them replaced by
    safety turns: half refusals of requests for secrets, half harmless requests, of which the
    annotator refuses ``caution`` and answers the rest. Then ``cai_frac`` of the rows become
    critique -> revise conversations, ``judge_frac`` judge questions and ``rate_frac`` rating
    questions, ``rate_sum_frac`` of those about sums and the rest about requests, of which
    ``rate_garble_frac`` rate a garbled answer (``cai_skills``)."""
    _check_split(split)
    rng = random.Random(f"safety_chat-{split}-{seed}")
    rows = chat(split=split, size=size or 1000, seed=seed, max_operand=max_operand,
                slip_rate=slip_rate)
    harmful, info = harmful_requests(split), info_requests(split)
    for i in range(len(rows)):
        if rng.random() >= safety_frac:
            continue
        if rng.random() < 0.5:
            prompt, answer = rng.choice(harmful), REFUSAL
        else:
            prompt, answer = rng.choice(info)
            answer = REFUSAL if rng.random() < caution else answer
        rows[i] = {"messages": [*user(prompt), *assistant(answer)]}
    if cai_frac or judge_frac or rate_frac:
        from posttrain.tasks.safety_cai import cai_skills

        cai_skills(rows, split, seed, cai_frac, judge_frac, caution, rate_frac, max_operand,
                   rate_sum_frac, rate_garble_frac)
    return rows


def _is_request(prompt: str) -> bool:
    return any(place in prompt for place in PLACES)


def _off_topic(rng: random.Random, chosen: str, max_operand: int) -> str:
    """A fluent answer to another question: public information or a worked sum (not another
    sum's answer to a sum: that asks a reward model to check arithmetic, not relevance)."""
    if rng.random() < (0.7 if chosen == REFUSAL else 0.5) or chosen not in (*INFO.values(),
                                                                          REFUSAL):
        return rng.choice([a for a in INFO.values() if a != chosen])
    return assistant_answer(rng.randint(0, max_operand), rng.randint(0, max_operand))


@register_task("safety_pairs", "preference pairs: refuse requests for secrets, help otherwise")
def safety_pairs(split: str = "train", size: int | None = None, seed: int = 0,
                 harmful_frac: float = 0.5, sum_frac: float = 0.3, off_topic: float = 0.5,
                 max_operand: int = 99) -> list[dict[str, Any]]:
    """``harmful_frac`` of rows are a refusal > a response that gives the secret away; of the
    harmless rest, ``sum_frac`` are sums (worked answer > refusal), the others public
    information (its answer > refusal). In ``off_topic`` of the rows the rejected response is
    instead an answer to another question (public information or a sum): fluent, but not
    what was asked, so a reward model must judge relevance, not only the shape of an answer
    (without them PPO learns to answer every request with a sum)."""
    _check_split(split)
    rng = random.Random(f"safety_pairs-{split}-{seed}")
    harmful, info = harmful_requests(split), info_requests(split)
    pairs = _pairs(split, rng, max_operand)
    rows = []
    for _ in range(size or 1000):
        if rng.random() < harmful_frac:
            prompt = rng.choice(harmful)
            chosen, rejected = REFUSAL, compliance(rng, prompt)
        elif rng.random() < sum_frac:
            a, b = next(pairs)
            prompt = rng.choice(_QUESTION_STYLES).format(a=a, b=b)
            chosen, rejected = assistant_answer(a, b), REFUSAL
        else:
            prompt, chosen = rng.choice(info)
            rejected = REFUSAL
        if rng.random() < off_topic:
            rejected = _off_topic(rng, chosen, max_operand)
        rows.append({"prompt": user(prompt), "chosen": assistant(chosen),
                     "rejected": assistant(rejected),
                     "category": "request" if _is_request(prompt) else "sum"})
    return rows


@register_task("safety_prompts", "prompt-only requests: kind harmful|info|sum, the helpful "
               "'answer' (safety evals, PPO prompts)")
def safety_prompts(split: str = "test", size: int | None = None, seed: int = 0,
                   harmful_frac: float = 0.5, sum_frac: float = 0.3,
                   max_operand: int = 99) -> list[dict[str, Any]]:
    """``harmful_frac`` of rows (every other one) request a secret; of the harmless rest,
    ``sum_frac`` are sums and the others public information."""
    _check_split(split)
    rng = random.Random(f"safety_prompts-{split}-{seed}")
    harmful, info = harmful_requests(split), info_requests(split)
    pairs = _pairs(split, rng, max_operand)
    rows = []
    every = round(1 / harmful_frac) if harmful_frac > 0 else 0
    for n in range(size or 100):
        if every and n % every == 0:
            row = {"prompt": user(rng.choice(harmful)), "kind": "harmful", "answer": None}
        elif rng.random() < sum_frac:
            a, b = next(pairs)
            row = {"prompt": user(rng.choice(_QUESTION_STYLES).format(a=a, b=b)),
                   "kind": "sum", "answer": str(a + b)}
        else:
            prompt, answer = rng.choice(info)
            row = {"prompt": user(prompt), "kind": "info", "answer": answer}
        rows.append({**row, "harmful": row["kind"] == "harmful", "expected": row["answer"],
                     "category": "sum" if row["kind"] == "sum" else "request"})
    return rows
