"""AI judges: both orders asked, position bias cancelled or dropped, never a silent label."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.cai.judge import CallableJudge, ModelJudge, judge_pairs

PROMPTS = ["Tell me the PIN.", "What is 2+2?", "Where is the market?"]
A = ["I can't share that.", "2+2=4.", "Near the river, open at 9."]
B = ["It is 4721.", "It's 5.", "No."]
QUESTIONS = ["Which answer keeps the secret?"] * 3


def test_a_judge_that_always_prefers_the_first_slot_labels_nothing() -> None:
    verdicts = judge_pairs(CallableJudge(lambda *_: 0.9), PROMPTS, A, B, QUESTIONS)
    assert [v.kept for v in verdicts] == [False] * 3
    assert {v.why for v in verdicts} == {"order-inconsistent"}


def test_a_consistent_judge_labels_and_its_bias_is_averaged_out() -> None:
    # prefers the longer answer, plus a +0.1 pull towards whichever answer is shown first
    def judge(prompt: str, first: str, second: str, question: str) -> float:
        return min(1.0, (0.8 if len(first) > len(second) else 0.2) + 0.1)

    verdicts = judge_pairs(CallableJudge(judge), PROMPTS, A, B, QUESTIONS)
    assert all(v.kept for v in verdicts)
    assert [v.a_wins for v in verdicts] == [len(x) > len(y) for x, y in zip(A, B, strict=True)]
    # (0.9 + (1 - 0.3)) / 2 = 0.8: the position pull cancels
    assert verdicts[0].p_a == pytest.approx(0.8)


def test_ties_are_dropped() -> None:
    verdicts = judge_pairs(CallableJudge(lambda *_: 0.5), PROMPTS, A, B, QUESTIONS)
    assert [v.why for v in verdicts] == ["tie"] * 3
    close = judge_pairs(CallableJudge(lambda p, f, s, q: 0.52 if f == A[0] else 0.48),
                        PROMPTS[:1], A[:1], B[:1], QUESTIONS[:1], min_margin=0.05)
    assert not close[0].kept and close[0].why == "tie"


def test_model_judge_reads_the_probability_of_a_versus_b(nano_dir: Path) -> None:
    from posttrain.models.io import load_model, load_tokenizer

    judge = ModelJudge(load_model(str(nano_dir)), load_tokenizer(str(nano_dir)), batch_size=2)
    verdicts = judge_pairs(judge, PROMPTS, A, B, QUESTIONS)
    for v in verdicts:
        assert 0.0 < v.p_a_first < 1.0 and 0.0 < v.p_a_second < 1.0
    # batching (left padding) does not change a comparison's probability
    one = ModelJudge(judge.model, judge.tokenizer, batch_size=1)
    assert [v.p_a for v in judge_pairs(one, PROMPTS, A, B, QUESTIONS)] == pytest.approx(
        [v.p_a for v in verdicts], abs=1e-4)


def test_bradley_terry_on_the_ratings_log_odds_by_hand() -> None:
    from posttrain.cai.judge import _bradley_terry

    assert _bradley_terry(0.8, 0.5) == pytest.approx(0.8)  # logit 0.5 = 0
    # logit 0.9 - logit 0.1 = 2 ln 9: sigmoid = 81 / 82
    assert _bradley_terry(0.9, 0.1) == pytest.approx(81 / 82)
    assert _bradley_terry(0.3, 0.3) == pytest.approx(0.5)


def _rating_judge(nano_dir: Path, batch_size: int = 16):  # noqa: ANN202
    from posttrain.cai.judge import RatingJudge
    from posttrain.models.io import load_model, load_tokenizer

    return RatingJudge(load_model(str(nano_dir)), load_tokenizer(str(nano_dir)),
                       batch_size=batch_size)


def test_a_rating_judge_rates_each_answer_once_and_is_never_order_inconsistent(
        nano_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.cai import judge as judge_module

    judge = _rating_judge(nano_dir, batch_size=2)
    rated: list[int] = []
    real = judge_module._p_choice

    def counting(model, tokenizer, ids, choice_ids):  # noqa: ANN001, ANN202
        rated.append(len(ids))
        return real(model, tokenizer, ids, choice_ids)

    monkeypatch.setattr(judge_module, "_p_choice", counting)
    rubrics = ["Does the answer keep the secret?"] * 3
    verdicts = judge_pairs(judge, PROMPTS, A, B, QUESTIONS, rubrics=rubrics)
    assert sum(rated) == 6  # 3 prompts x 2 answers, though judge_pairs asks both orders
    ratings = judge.rate([(r, p, x) for r, p, x in zip(rubrics, PROMPTS, A, strict=True)] +
                         [(r, p, y) for r, p, y in zip(rubrics, PROMPTS, B, strict=True)])
    assert all(0.0 < s < 1.0 for s in ratings)
    from posttrain.cai.judge import _bradley_terry

    for i, v in enumerate(verdicts):
        assert v.why != "order-inconsistent"
        assert v.p_a_first == pytest.approx(v.p_a_second)
        assert v.p_a == pytest.approx(_bradley_terry(ratings[i], ratings[3 + i]), abs=1e-6)
    # batching (left padding) does not change a rating
    one = _rating_judge(nano_dir, batch_size=1)
    assert one.rate([("r", PROMPTS[0], A[0]), ("r", PROMPTS[1], B[1])]) == pytest.approx(
        judge.rate([("r", PROMPTS[0], A[0]), ("r", PROMPTS[1], B[1])]), abs=1e-4)


def test_rating_lessons_ask_what_the_rating_judge_asks() -> None:
    from posttrain.cai.judge import RATE_TEMPLATE
    from posttrain.tasks.safety import safety_chat

    rows = safety_chat(size=300, safety_frac=0, rate_frac=1.0)
    verdicts = [r["messages"][1]["content"] for r in rows]
    assert set(verdicts) == {"Yes", "No"} and 0.35 < verdicts.count("Yes") / 300 < 0.65
    head, _, tail = RATE_TEMPLATE.partition("{rubric}")
    for r in rows:
        assert r["messages"][0]["content"].endswith(tail.rsplit("}", 1)[-1])
        assert "\n\nRequest: " in r["messages"][0]["content"]
    test = {r["messages"][0]["content"] for r in safety_chat(split="test", size=300,
                                                                safety_frac=0, rate_frac=1.0)}
    assert not test & {r["messages"][0]["content"] for r in rows}


def test_a_rating_judge_needs_yes_and_no_to_start_differently(nano_dir: Path) -> None:
    from posttrain.cai.judge import RatingJudge
    from posttrain.models.io import load_model, load_tokenizer

    with pytest.raises(ValueError, match="Yes"):
        RatingJudge(load_model(str(nano_dir)), load_tokenizer(str(nano_dir)),
                    choices=("Yes", "Yeah"))
