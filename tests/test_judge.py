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
