"""The skills Constitutional AI asks of the demo's SFT model, as demonstrations.

CAI (seed §5.8) relies on a model that, *when asked*, can critique an answer against a
principle, rewrite it, and say which of two answers follows a principle better; what it does
*by default* is another matter. The demo's annotators refuse harmless requests by default
(``caution``), yet their demonstrations of the explicit skills follow the demo constitution
(``cai/files/demo.yaml``), so a model taught both (the demo's ``skills`` stage, after SFT)
learns over-cautious answers, and principled critiques, revisions and verdicts when prompted.
Constitutional AI then turns the prompted behaviour into the default one, without a single
human preference label.

- critique -> revise: ``user: request / assistant: the annotator's answer / user: the
  principle's critique request / assistant: the critique / user: its revision request /
  assistant: the revision`` (the request's right answer: a refusal for a secret, the public
  information otherwise), exactly the conversation ``posttrain cai revise`` builds. The
  critique names the thing asked for and whether it is secret before its verdict ("The
  opening hours: public, refused. Yes.");
- judging: the prompt ``cai.judge.ModelJudge`` shows (the principle's judge question, the
  request, answers A and B) and the letter of the better answer, which is what the judge's
  next-token probability reads;
- rating: the prompt ``cai.judge.RatingJudge`` shows (the principle's yes/no rubric, a request
  or a sum, one answer) and "Yes" or "No": the same verdicts, one answer at a time.

Every assistant turn is a target (``messages`` rows), so no demonstration contains a bad
answer as the assistant's own turn: the annotator's first answers are the same kind of
answers as in the other rows, and bad answers to judge appear only inside the question.
"""

from __future__ import annotations

import functools
import random
from typing import TYPE_CHECKING, Any

from posttrain.tasks.builtin import _QUESTION_STYLES, _pairs, assistant_answer, has_carry
from posttrain.tasks.safety_world import (
    INFO,
    REFUSAL,
    assistant,
    compliance,
    harmful_requests,
    info_requests,
    requested_thing,
    user,
)

if TYPE_CHECKING:
    from posttrain.cai.constitution import Constitution

REQUEST, SUM = "request", "sum"  # the demo constitution's categories


@functools.cache
def _demo() -> Constitution:
    """The demo constitution, read once: every skill row draws a principle from it."""
    from posttrain.cai import load_constitution

    return load_constitution("demo")


def _critique(principle: str, thing: str, harmful: bool, refused: bool) -> str:
    """The critique of an answer under a principle, as the constitution's author writes it.

    It names what the request asks for and whether that is secret before the verdict: the
    model copies the thing from the request, and the verdict then hangs on one word said right
    after it ("secret" or "public") instead of on the whole request at once, which a tiny model
    gets wrong for some harmless requests."""
    reason = f"The {thing}: {'secret' if harmful else 'public'}"
    if principle == "secrets":
        if not harmful:
            return f"{reason}. No."
        return f"{reason}, kept. No." if refused else f"{reason}, given away. Yes."
    if harmful:
        return f"{reason}, rightly refused. No."
    return f"{reason}, refused. Yes." if refused else f"{reason}, answered. No."


def critique_revise(rng: random.Random, split: str, caution: float) -> dict[str, Any]:
    """One critique -> revise conversation about a request (harmful or not)."""
    principle = _demo().sample(rng, REQUEST)
    if rng.random() < 0.5:
        prompt, right, refused = rng.choice(harmful_requests(split)), REFUSAL, True
    else:
        prompt, right = rng.choice(info_requests(split))
        refused = rng.random() < caution
    first = REFUSAL if refused else right
    harmful = right == REFUSAL
    critique = _critique(principle.name, requested_thing(prompt), harmful, refused)
    return {"messages": [*user(prompt), *assistant(first), *user(principle.critique),
                         *assistant(critique),
                         *user(principle.revision), *assistant(right)]}


def _off_topic(rng: random.Random, better: str) -> str:
    """A fluent answer to another question: public information, or a worked sum."""
    if rng.random() < 0.5:
        return assistant_answer(rng.randint(0, 99), rng.randint(0, 99))
    return rng.choice([a for a in INFO.values() if a != better])


def judgement(rng: random.Random, split: str) -> dict[str, Any]:
    """One judge question: a request, a better and a worse answer in random slots, and the
    letter of the better one."""
    from posttrain.cai.judge import JUDGE_TEMPLATE

    principle = _demo().sample(rng, REQUEST)
    if rng.random() < 0.5:
        prompt, better = rng.choice(harmful_requests(split)), REFUSAL
        worse = compliance(rng, prompt) if rng.random() < 0.5 else _off_topic(rng, better)
    else:
        prompt, better = rng.choice(info_requests(split))
        worse = REFUSAL if rng.random() < 0.5 else _off_topic(rng, better)
    first_better = rng.random() < 0.5
    first, second = (better, worse) if first_better else (worse, better)
    question = JUDGE_TEMPLATE.format(question=principle.judge, prompt=prompt, first=first,
                                     second=second)
    return {"messages": [*user(question), *assistant("A" if first_better else "B")]}


def _rated_answer(rng: random.Random, split: str, max_operand: int, sum_frac: float,
                  garble_frac: float = 0.0) -> tuple[str, str, str, bool]:
    """(category, prompt, answer, follows the rules?): a sum in ``sum_frac`` of the lessons,
    else a request; the wrong answers are those the pairs reject."""
    if rng.random() < sum_frac:
        return _rated_sum(rng, split, max_operand)
    return _rated_request(rng, split, garble_frac)


def _rated_request(rng: random.Random, split: str,
                   garble_frac: float = 0.0) -> tuple[str, str, str, bool]:
    """Half the requests are for a secret: refused (right), or answered with the secret or
    another question's answer. The others are harmless: refused as often (wrong), else
    answered, with the right information or another thing's. A refusal is right for exactly
    half of the requests it answers, so no answer's shape alone gives the verdict.

    In ``garble_frac`` of the lessons whose answer is not the refusal, the answer is garbled
    instead (wrong): the right answer running into another one, as a small model's sampled
    answers do ("Saturday is two bus stops right outside."), so the judge reads an answer to
    its end. The refusal's share, and so its balance, stays as it is."""
    garble = garble_frac > 0 and rng.random() < garble_frac
    if rng.random() < 0.5:
        prompt = rng.choice(harmful_requests(split))
        if rng.random() < 0.5:
            return REQUEST, prompt, REFUSAL, True
        if garble:
            return REQUEST, prompt, _garbled(rng, REFUSAL), False
        bad = compliance(rng, prompt) if rng.random() < 0.5 else _off_topic(rng, REFUSAL)
        return REQUEST, prompt, bad, False
    prompt, right = rng.choice(info_requests(split))
    u = rng.random()
    if u < 0.5:
        return REQUEST, prompt, REFUSAL, False
    if garble:
        return REQUEST, prompt, _garbled(rng, right), False
    return (REQUEST, prompt, right, True) if u < 0.85 else \
        (REQUEST, prompt, _off_topic(rng, right), False)


def _garbled(rng: random.Random, text: str) -> str:
    """The beginning of ``text`` running into the end of another answer of this world."""
    other = rng.choice([a for a in (*INFO.values(), REFUSAL) if a != text])
    return text[:rng.randint(4, len(text) - 4)] + other[rng.randint(2, len(other) - 6):]


def _rated_sum(rng: random.Random, split: str, max_operand: int) -> tuple[str, str, str, bool]:
    """A worked sum (right), or a forgotten carry, public information or a refusal."""
    prompt, (a, b) = _sum_question(rng, split, max_operand)
    if rng.random() < 0.5:
        return SUM, prompt, assistant_answer(a, b), True
    wrong = [rng.choice(list(INFO.values())), REFUSAL]
    if has_carry(a, b):
        wrong.append(assistant_answer(a, b, forget_carries=True))
    return SUM, prompt, rng.choice(wrong), False


def _sum_question(rng: random.Random, split: str, max_operand: int) -> tuple[str,
                                                                            tuple[int, int]]:
    a, b = next(_pairs(split, rng, max_operand))
    return rng.choice(_QUESTION_STYLES).format(a=a, b=b), (a, b)


def rating(rng: random.Random, split: str, max_operand: int = 99,
           sum_frac: float = 0.25, garble_frac: float = 0.0) -> dict[str, Any]:
    """One rating question: a principle's rubric about one answer, and "Yes" or "No"."""
    from posttrain.cai.judge import RATE_TEMPLATE

    category, prompt, answer, good = _rated_answer(rng, split, max_operand, sum_frac,
                                                   garble_frac)
    principle = _demo().sample(rng, category)
    question = RATE_TEMPLATE.format(rubric=principle.rubric, prompt=prompt, answer=answer)
    return {"messages": [*user(question), *assistant("Yes" if good else "No")]}


def cai_skills(rows: list[dict[str, Any]], split: str, seed: int, cai_frac: float,
               judge_frac: float, caution: float, rate_frac: float = 0.0,
               max_operand: int = 99, rate_sum_frac: float = 0.25,
               rate_garble_frac: float = 0.0) -> None:
    """Replace ``cai_frac`` of ``rows`` by critique -> revise conversations, ``judge_frac``
    by judge questions and ``rate_frac`` by rating questions (``rate_sum_frac`` of them
    about sums, ``rate_garble_frac`` of those about requests rating a garbled answer), in
    place (a separate random stream: the other rows stay the ones all fractions 0 give)."""
    fracs = (cai_frac, judge_frac, rate_frac)
    if min(fracs) < 0 or sum(fracs) > 1 + 1e-9:
        raise ValueError(f"cai_frac + judge_frac + rate_frac must be within [0, 1], got "
                         f"{' + '.join(map(str, fracs))}")
    for name, frac in (("rate_sum_frac", rate_sum_frac), ("rate_garble_frac", rate_garble_frac)):
        if not 0 <= frac <= 1:
            raise ValueError(f"{name} must be within [0, 1], got {frac}")
    rng = random.Random(f"safety_chat-cai-{split}-{seed}")
    for i in range(len(rows)):
        u = rng.random()
        if u < cai_frac:
            rows[i] = critique_revise(rng, split, caution)
        elif u < cai_frac + judge_frac:
            rows[i] = judgement(rng, split)
        elif u < sum(fracs):
            rows[i] = rating(rng, split, max_operand, rate_sum_frac, rate_garble_frac)
