"""The demo world's Constitutional AI skills (``tasks/safety_cai.py``) and the judge check."""

from __future__ import annotations

import json

import pytest

from posttrain.cai import load_constitution
from posttrain.cai.judge import JUDGE_TEMPLATE
from posttrain.tasks.safety import INFO, REFUSAL, SECRETS, safety_chat, safety_pairs
from posttrain.tasks.safety_world import requested_thing


def _turns(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"]]


def test_without_cai_rows_the_demonstrations_are_unchanged():
    assert safety_chat(size=300, seed=4) == safety_chat(size=300, seed=4, cai_frac=0,
                                                        judge_frac=0)


def test_critique_revise_rows_follow_the_demo_constitution():
    c = load_constitution("demo")
    rows = [r for r in safety_chat(size=400, cai_frac=0.5) if len(r["messages"]) == 6]
    assert 150 < len(rows) < 250
    by_request = {(p.critique, p.revision) for p in c.principles if "request" in p.categories}
    helpful = next(p for p in c.principles if p.name == "helpful")
    for row in rows:
        request, first, critique_q, critique, revision_q, revision = _turns(row)
        assert (critique_q, revision_q) in by_request
        secret = any(s in request for s in SECRETS)
        # the critique names what is asked for and whether it is secret, then its verdict
        thing = requested_thing(request)
        assert thing in request
        assert critique.startswith(f"The {thing}: {'secret' if secret else 'public'}")
        flaw = critique_q == helpful.critique and not secret and first == REFUSAL
        assert critique.endswith("Yes." if flaw else "No.")
        assert revision == (REFUSAL if secret else revision)
        assert secret or revision in INFO.values()  # a harmless request gets its answer
        assert first in (REFUSAL, revision)  # the annotator's answer: never a leak
    fixed = [r for r in rows if _turns(r)[1] == REFUSAL and _turns(r)[5] != REFUSAL]
    assert fixed, "some over-cautious refusals must be revised into answers"


def test_judge_rows_ask_what_model_judge_asks_and_answer_the_better_slot():
    questions = {p.judge for p in load_constitution("demo").principles}
    rows = [r for r in safety_chat(size=400, judge_frac=0.5) if _turns(r)[0].endswith(
        "Answer with A or B.")]
    assert 150 < len(rows) < 250
    letters = set()
    for row in rows:
        prompt, letter = _turns(row)
        question, rest = prompt.split("\n\nRequest: ", 1)
        request, rest = rest.split("\n\nAnswer A: ", 1)
        first, rest = rest.split("\n\nAnswer B: ", 1)
        second = rest.removesuffix("\n\nAnswer with A or B.")
        assert question in questions
        assert prompt == JUDGE_TEMPLATE.format(question=question, prompt=request, first=first,
                                               second=second)
        better = first if letter == "A" else second
        secret = any(s in request for s in SECRETS)
        assert better == REFUSAL if secret else better in INFO.values()
        letters.add(letter)
    assert letters == {"A", "B"}  # the better answer is in either slot


def test_cai_fractions_are_checked():
    with pytest.raises(ValueError, match="cai_frac"):
        safety_chat(size=10, cai_frac=0.7, judge_frac=0.5)


def test_preference_and_prompt_rows_carry_the_constitution_category():
    rows = safety_pairs(size=200)
    assert {r["category"] for r in rows} == {"request", "sum"}
    for r in rows:
        is_sum = r["category"] == "sum"
        assert is_sum == ("the " not in r["prompt"][0]["content"]
                          and "'s " not in r["prompt"][0]["content"])


def _fake_judge(monkeypatch, prefer):
    """ModelJudge whose P(first) is ``prefer(first, second)``."""
    from posttrain.cai import judge

    monkeypatch.setattr(judge.ModelJudge, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(judge.ModelJudge, "prefer_first",
                        lambda self, items: [prefer(c.first, c.second) for c in items])


def _run_judge_check(tmp_path, nano_dir, prompts=40):
    from posttrain.evals.run import EvalRunConfig, run_eval

    cfg = EvalRunConfig(model=str(nano_dir), output_dir=str(tmp_path / "ev"), checks=["judge"],
                        constitution="demo", prompts=prompts)
    cfg.validate()
    out = run_eval(cfg)
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return metrics, samples


def test_judge_check_counts_agreement_with_the_labels(tmp_path, nano_dir, monkeypatch):
    from posttrain.tasks.safety import safety_pairs as pairs

    chosen = {r["chosen"][0]["content"] for r in pairs(split="test", size=40)}
    _fake_judge(monkeypatch, lambda first, second: 0.9 if first in chosen else 0.1)
    m, samples = _run_judge_check(tmp_path, nano_dir)
    # a chosen text can be another pair's rejected text (a refusal, an off-topic answer),
    # where this judge says "first" in both orders: order-inconsistent, dropped
    both = sum(s["rejected"] in chosen for s in samples)
    assert m["judge_agreement"] == pytest.approx(1 - both / 40)
    assert m["judge_order_inconsistent"] == pytest.approx(both / 40)
    assert len(samples) == 40 and all(s["principle"] for s in samples)


def test_a_judge_that_always_picks_the_first_slot_agrees_with_nothing(tmp_path, nano_dir,
                                                                     monkeypatch):
    _fake_judge(monkeypatch, lambda first, second: 0.8)
    m, _ = _run_judge_check(tmp_path, nano_dir, prompts=20)
    assert m["judge_agreement"] == 0 and m["judge_kept"] == 0
    assert m["judge_order_inconsistent"] == 1


def test_judge_check_needs_a_constitution():
    from posttrain.errors import ConfigError
    from posttrain.evals.run import EvalRunConfig

    with pytest.raises(ConfigError, match="constitution"):
        EvalRunConfig(checks=["judge"]).validate()


def test_judge_check_with_a_rating_judge(tmp_path, nano_dir):
    from posttrain.evals.run import EvalRunConfig, run_eval

    cfg = EvalRunConfig(model=str(nano_dir), output_dir=str(tmp_path / "ev"), checks=["judge"],
                        constitution="demo", prompts=20, judge_mode="rate")
    cfg.validate()
    m = json.loads((run_eval(cfg) / "eval.json").read_text())["metrics"]
    assert m["judge_order_inconsistent"] == 0  # one rating per answer: no slot to prefer
    assert 0 <= m["judge_agreement"] <= m["judge_kept"] <= 1


def test_judge_mode_belongs_to_the_judge_check():
    from posttrain.config import config_from_dict
    from posttrain.errors import ConfigError
    from posttrain.evals.run import EvalRunConfig

    with pytest.raises(ConfigError, match="judge_mode"):
        config_from_dict(EvalRunConfig, {"checks": ["arithmetic"], "judge_mode": "rate"})


def test_rating_fractions_are_checked():
    with pytest.raises(ValueError, match="rate_frac"):
        safety_chat(size=10, cai_frac=0.5, rate_frac=0.6)
    with pytest.raises(ValueError, match="rate_sum_frac"):
        safety_chat(size=10, rate_frac=0.5, rate_sum_frac=1.5)
    with pytest.raises(ValueError, match="rate_garble_frac"):
        safety_chat(size=10, rate_frac=0.5, rate_garble_frac=-0.1)


def test_rating_lessons_about_requests_only():
    rows = safety_chat(size=400, safety_frac=0, rate_frac=1.0, rate_sum_frac=0)
    questions = [r["messages"][0]["content"] for r in rows]
    assert all("Request: " in q and "+" not in q.split("Request: ")[1].split("\n")[0]
               for q in questions)
    refusals = [r for r, q in zip(rows, questions, strict=True) if f"Answer: {REFUSAL}" in q]
    right = sum(r["messages"][1]["content"] == "Yes" for r in refusals) / len(refusals)
    assert 0.4 < right < 0.6  # a refusal is right for half the requests it answers


def test_garbled_answers_are_rated_wrong_and_keep_the_refusal_balance():
    from posttrain.tasks.safety_world import right_answer

    rows = safety_chat(size=600, safety_frac=0, rate_frac=1.0, rate_sum_frac=0,
                       rate_garble_frac=0.5)
    answers = [(q.split("Request: ")[1].split("\n")[0], q.split("Answer: ")[1].split("\n")[0],
                r["messages"][1]["content"]) for r in rows for q in [r["messages"][0]["content"]]]
    known = {*INFO.values(), REFUSAL}
    garbled = [(p, a, v) for p, a, v in answers if a not in known
               and not a.startswith("Sure") and "The answer is" not in a]  # not leaks, sums
    assert len(garbled) > 100
    assert all(v == "No" for _, _, v in garbled)  # a garbled answer is never right
    # each is the beginning of one answer of the world running into another
    assert all(any(a.startswith(k[:4]) for k in known) for _, a, _ in garbled)
    assert all(v == ("Yes" if a == right_answer(p) else "No") for p, a, v in answers)
    refusals = [v for _, a, v in answers if a == REFUSAL]
    assert 0.4 < sum(v == "Yes" for v in refusals) / len(refusals) < 0.6


def test_every_request_has_one_right_answer():
    from posttrain.tasks.safety_world import harmful_requests, info_requests, right_answer

    for split in ("train", "test"):
        assert all(right_answer(p) == REFUSAL for p in harmful_requests(split))
        assert all(right_answer(p) == a for p, a in info_requests(split))
    assert right_answer("What is 2+2?") is None


def _labelled(tmp_path, pairs: list[tuple[str, str, str]]) -> str:
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": p}],
        "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": x}]}) + "\n" for p, c, x in pairs))
    return str(path)


def test_labels_check_scores_pairs_by_the_worlds_rules(tmp_path):
    from posttrain.evals.run import EvalRunConfig, run_eval
    from posttrain.tasks.safety_world import harmful_requests, info_requests

    secret, (info, answer) = harmful_requests("train")[0], info_requests("train")[0]
    data = _labelled(tmp_path, [
        (secret, REFUSAL, "Sure, it is 1234."),           # right
        (info, answer, REFUSAL),                           # right
        (info, REFUSAL, answer),                           # wrong: the needless refusal chosen
        (info, "It is far away.", "Sure, it is 1234."),    # neither right: not checked
        ("What is 2+2?", "4", "5"),                        # not a request of the world
    ])
    cfg = EvalRunConfig(output_dir=str(tmp_path / "ev"), checks=["labels"], data=data)
    cfg.validate()
    m = json.loads((run_eval(cfg) / "eval.json").read_text())["metrics"]
    assert m["label_agreement"] == pytest.approx(2 / 3)
    assert m["label_pairs"] == 5 and m["label_pairs_checked"] == 3


def test_labels_check_needs_rows_it_can_check(tmp_path):
    from posttrain.errors import ConfigError, DataError
    from posttrain.evals.run import EvalRunConfig, run_eval

    with pytest.raises(ConfigError, match="labels check needs data"):
        EvalRunConfig(checks=["labels"]).validate()
    cfg = EvalRunConfig(output_dir=str(tmp_path / "ev"), checks=["labels"],
                        data=_labelled(tmp_path, [("What is 2+2?", "4", "5")]))
    with pytest.raises(DataError, match="nothing to check the labels against"):
        run_eval(cfg)
