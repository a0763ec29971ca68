"""Eval suite kinds code, preference and judge (``evals/suite_kinds.py``): load-time checks,
hand-worked numbers through stub generators/scorers, resume, and a real ``posttrain eval``
run of each kind on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain.errors import ConfigError, DataError
from posttrain.evals import suite as S
from posttrain.evals import suite_kinds as K
from posttrain.evals.run import EvalRunConfig, run_eval
from posttrain.evals.stats import pass_at_k, wilson_interval
from posttrain.sandbox.bwrap import find_bwrap
from posttrain.sandbox.runner import probe_bwrap
from tests.conftest import write_jsonl

_BWRAP = find_bwrap()
_PROBLEM = "bwrap not installed" if _BWRAP is None else probe_bwrap(_BWRAP)
needs_bwrap = pytest.mark.skipif(
    _PROBLEM is not None, reason=f"bubblewrap unavailable ({_PROBLEM}); apt-get install bubblewrap")


def _suite(tmp_path: Path, tasks: list[dict[str, Any]]) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks}))
    return path


def _run(tmp_path: Path, suite: Path, model: str = "stub", **kw: Any) -> dict[str, Any]:
    cfg = EvalRunConfig(model=model, suite=str(suite), output_dir=str(tmp_path / "out"), **kw)
    cfg.validate()
    return json.loads((run_eval(cfg) / "eval.json").read_text())["metrics"]


def _items(tmp_path: Path, task: str) -> list[dict[str, Any]]:
    lines = (tmp_path / "out" / "items" / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


class Stub:
    """Replaces model loading and generation: ``answer(model, prompt, n)`` gives the texts;
    every (model, prompt) generated is recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answer: Any) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.answer = answer
        monkeypatch.setattr(S, "load_policy", lambda model, precision: (model, None))
        monkeypatch.setattr(S, "generate_texts", self)

    def __call__(self, model: str, tok: Any, prompts: list[Any], *, n: int,
                 **_: Any) -> list[list[str | None]]:
        self.calls += [(model, p) for p in prompts]
        return [self.answer(model, p, n) for p in prompts]


# --------------------------------------------------------------------------- load-time checks


ADD_TESTS = ("def check(candidate):\n    assert candidate(1, 2) == 3\n"
             "    assert candidate(0, 0) == 0\n")
CODE_ROWS = [
    {"prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n", "tests": ADD_TESTS, "entry_point": "add",
     "category": "math"},
    {"prompt": [{"role": "user", "content": "Write rev(s) reversing a string."}],
     "tests": "assert rev('ab') == 'ba'\nassert rev('') == ''\n", "category": "strings"},
]
PREF_ROWS = [
    {"prompt": "q1", "chosen": "ok!!!", "rejected": "ok!", "category": "a"},
    {"prompt": "q2", "chosen": "ok!", "rejected": "ok!!", "category": "a"},
    {"prompt": "q3", "chosen": "yes!", "rejected": "no!", "category": "a"},
    {"prompt": "q4", "chosen": "yes!!", "rejected": "no", "category": "b"},
    {"prompt": "q5", "chosen": "boom!", "rejected": "x", "category": "b"},
]
JUDGE_ROWS = [{"prompt": f"p{i}", "category": "a" if i < 3 else "b"} for i in range(1, 7)]
JUDGE = "tests.test_eval_suite_kinds:fake_judge"


def _write_data(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
    write_jsonl(tmp_path / "pairs.jsonl", PREF_ROWS)
    write_jsonl(tmp_path / "prompts.jsonl", JUDGE_ROWS)
    write_jsonl(tmp_path / "bad_code.jsonl", [{"prompt": "def f():\n", "category": "x"}])
    write_jsonl(tmp_path / "blank_cat.jsonl", [{"prompt": "p", "category": " "}])


CODE = {"name": "t", "kind": "code", "data": "code.jsonl", "isolation": "limits-only"}
PREF = {"name": "t", "kind": "preference", "data": "pairs.jsonl"}
JUDGE_TASK = {"name": "t", "kind": "judge", "data": "prompts.jsonl", "baseline": "base",
              "judge": JUDGE}


@pytest.mark.parametrize("task, key, err", [
    ({**CODE, "colour": 1}, "colour", ConfigError),
    ({**CODE, "data": "nope.jsonl"}, "data", DataError),
    ({**CODE, "categories": ["math", "strings", "art"]}, "categories", DataError),
    ({**CODE, "n": 2, "k": [3]}, "k", ConfigError),
    ({**CODE, "data": "bad_code.jsonl"}, "tests", DataError),
    ({**CODE, "timeout": 0}, "timeout", ConfigError),
    ({**CODE, "isolation": "chroot"}, "isolation", ConfigError),
    ({**PREF, "max_new_tokens": 5}, "max_new_tokens", ConfigError),
    ({**PREF, "reward_model": "rm", "reference": "ref"}, "reference", ConfigError),
    ({**PREF, "beta": 0.5}, "beta", ConfigError),
    ({**PREF, "data": "nope.jsonl"}, "data", DataError),
    ({**PREF, "categories": ["a"]}, "categories", DataError),
    ({**JUDGE_TASK, "baseline": None}, "baseline", ConfigError),
    ({**JUDGE_TASK, "judge": "tests.nowhere:fn"}, "judge", ConfigError),
    ({**JUDGE_TASK, "judge": {"url": "http://x", "model": "m", "colour": 1}}, "judge.colour",
     ConfigError),
    ({**JUDGE_TASK, "min_margin": 0.7}, "min_margin", ConfigError),
    ({**JUDGE_TASK, "data": "blank_cat.jsonl"}, "category", DataError),
])
def test_kind_errors_name_file_task_and_key(tmp_path: Path, task: dict[str, Any], key: str,
                                            err: type[Exception]) -> None:
    _write_data(tmp_path)
    path = _suite(tmp_path, [task])
    with pytest.raises(err) as e:
        S.load_suite(str(path))
    msg = str(e.value)
    assert str(path) in msg and "'t'" in msg and key in msg and "\n" not in msg


# --------------------------------------------------------------------------- code


def test_truncate_at_codex_stops() -> None:
    assert K.truncate("    return 1\n\ndef g():\n", K.CODEX_STOPS) == "    return 1\n"
    body = "    if x:\n        return 1\n"  # indented: not a new top-level statement
    assert K.truncate(body, K.CODEX_STOPS) == body


CODE_ANSWERS = {
    # continuations of add(): right, right once cut at "\ndef", wrong, crashed (None)
    "add": ["    return a + b\n", "    return a + b\n\ndef junk(:\n", "    return a - b\n", None],
    # chat answers: one fenced right solution, a wrong one, an endless loop, prose
    "rev": ["Here:\n```python\ndef rev(s):\n    return s[::-1]\n```", "def rev(s):\n    return s",
            "```python\ndef rev(s):\n    while True:\n        pass\n```", "I reverse strings."],
}


def _code_answer(model: str, prompt: Any, n: int) -> list[str | None]:
    return CODE_ANSWERS["add" if isinstance(prompt, str) else "rev"][:n]


@needs_bwrap
def test_code_pass_at_k_is_the_unbiased_estimator(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _write_data(tmp_path)
    Stub(monkeypatch, _code_answer)
    path = _suite(tmp_path, [{"name": "py", "kind": "code", "data": "code.jsonl", "n": 4,
                              "k": [1, 2, 4], "temperature": 0.8, "timeout": 2}])
    m = _run(tmp_path, path)
    # add: c = 2 of 4 (the cut sample passes; a - b fails; the crash fails); rev: c = 1 of 4
    # (the fenced solution; the loop times out). pass@k = 1 - C(n-c, k)/C(n, k) per problem:
    # pass@1 = (2/4 + 1/4)/2 = 3/8; pass@2 = (1 - 1/6 + 1 - 3/6)/2 = 2/3; pass@4 = 1
    assert m["py.pass@1"]["value"] == pytest.approx(3 / 8)
    assert m["py.pass@2"]["value"] == pytest.approx(2 / 3)
    assert m["py.pass@4"]["value"] == pytest.approx(1.0)
    assert m["py.pass@2"]["value"] == pytest.approx(
        (pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 2)
    assert m["py.pass@1"]["method"] == "bootstrap" and m["py.pass@1"]["n"] == 2
    assert m["py.by_category.math.pass@1"]["value"] == pytest.approx(0.5)
    assert m["py.by_category.strings.pass@2"]["value"] == pytest.approx(0.5)
    assert m["py.generation_errors"] == 1 and m["py.errors"] == 0
    passed = {json.dumps(r["prompt"])[:12]: r["passed"] for r in _items(tmp_path, "py")}
    assert sorted(passed.values()) == [[True, False, False, False], [True, True, False, False]]


@needs_bwrap
def test_code_greedy_canonical_passes_and_wrong_fails(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _write_data(tmp_path)
    Stub(monkeypatch, lambda model, p, n: ["    return a + b\n"] if isinstance(p, str)
         else ["def rev(s):\n    return s\n"])
    m = _run(tmp_path, _suite(tmp_path, [{"name": "py", "kind": "code", "data": "code.jsonl"}]))
    assert m["py.pass@1"] == wilson_interval(1, 2).to_dict()  # n = 1: a plain proportion
    assert m["py.by_category.math.pass@1"]["value"] == 1.0
    assert m["py.by_category.strings.pass@1"]["value"] == 0.0


# --------------------------------------------------------------------------- preference


def _fake_rm(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The RM's reward of a sequence is its number of "!"; a pair holding "boom" raises.
    Returns the list of pair counts scored per call."""
    import torch

    from posttrain.models import reward
    from posttrain.models.tiny import build_tokenizer

    tok, calls = build_tokenizer(), []

    def score_pairs(rm: Any, pairs: list[Any]) -> torch.Tensor:
        texts = [[tok.decode(s.input_ids) for s in (p.a, p.b)] for p in pairs]
        if any("boom" in t for pair in texts for t in pair):
            raise RuntimeError("reward model blew up")
        calls.append(len(pairs))
        return torch.tensor([[float(t.count("!")) for t in pair] for pair in texts])

    monkeypatch.setattr(K, "load_reward_scorer", lambda spec, precision: ("rm", tok))
    monkeypatch.setattr(reward, "score_pairs", score_pairs)
    return calls


def test_reward_model_accuracy_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_data(tmp_path)
    _fake_rm(monkeypatch)
    m = _run(tmp_path, _suite(tmp_path, [{**PREF, "name": "rm", "reward_model": "rm"}]))
    # margins r(chosen) - r(rejected): q1 3-1 = 2 (right), q2 1-2 = -1 (wrong), q3 1-1 = 0 (a
    # tie is wrong), q4 2-0 = 2 (right), q5 raises: recorded with error, wrong
    assert m["rm.accuracy"] == wilson_interval(2, 5).to_dict()
    assert m["rm.margin"]["value"] == pytest.approx((2 - 1 + 0 + 2) / 4)
    assert m["rm.margin"]["method"] == "bootstrap" and m["rm.margin"]["n"] == 4
    assert m["rm.by_category.a.accuracy"] == wilson_interval(1, 3).to_dict()
    assert m["rm.by_category.b.accuracy"] == wilson_interval(1, 2).to_dict()
    assert m["rm.errors"] == 1
    boom = [r for r in _items(tmp_path, "rm") if r["prompt"] == "q5"][0]
    assert "blew up" in boom["error"] and boom["correct"] is False


def test_the_suite_model_is_the_reward_model_by_default(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.models.tiny import build_tokenizer

    _write_data(tmp_path)
    _fake_rm(monkeypatch)
    seen: list[str] = []
    monkeypatch.setattr(K, "load_reward_scorer",
                        lambda spec, precision: (seen.append(spec), ("rm", build_tokenizer()))[1])
    m = _run(tmp_path, _suite(tmp_path, [PREF]), model="my-rm")
    assert seen == ["my-rm"] and m["t.accuracy"]["n"] == 5


# --------------------------------------------------------------------------- judge


def fake_judge(prompt: str, first: str, second: str, question: str) -> float:
    """P(first is better): the answer saying "good" wins; "biased" answers make it prefer
    whichever comes first (position bias); identical answers must never be asked."""
    assert first != second, "identical answers were sent to the judge"
    if prompt == "boom":
        raise RuntimeError("judge blew up")
    if "biased" in first:
        return 1.0
    return 0.5 + 0.5 * (("good" in first) - ("good" in second))


JUDGE_ANSWERS = {  # prompt -> (model's answer, baseline's answer)
    "p1": ("a good answer", "a bad answer"),     # win
    "p2": ("a bad answer", "a good answer"),     # loss
    "p3": ("biased x", "biased y"),              # order-inconsistent: a tie, reported
    "p4": ("the same", "the same"),              # identical: a tie, no judge call
    "p5": (None, "an answer"),                   # the model crashed: a loss with error
    "p6": ("good one", "good two"),              # the judge says 1/2 both ways: a tie
}


def _judge_answer(model: str, p: str, n: int) -> list[str | None]:
    return [JUDGE_ANSWERS[p][0 if model == "stub" else 1]]


def test_judge_win_rate_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_data(tmp_path)
    stub = Stub(monkeypatch, _judge_answer)
    m = _run(tmp_path, _suite(tmp_path, [{**JUDGE_TASK, "name": "vs"}]))
    assert {model for model, _ in stub.calls} == {"stub", "base"}
    # scores 1, 0, 1/2, 1/2, 0, 1/2 -> (wins + ties / 2) / items = (1 + 3/2) / 6
    assert m["vs.win_rate"]["value"] == pytest.approx(2.5 / 6)
    assert m["vs.win_rate"]["method"] == "bootstrap" and m["vs.win_rate"]["n"] == 6
    assert m["vs.win"] == wilson_interval(1, 6).to_dict()
    assert m["vs.tie"] == wilson_interval(3, 6).to_dict()
    assert m["vs.loss"] == wilson_interval(2, 6).to_dict()
    assert m["vs.inconsistent"] == wilson_interval(1, 6).to_dict()
    assert m["vs.errors"] == 1
    # category a = p1, p2 (no tie: a plain proportion, Wilson); b = p3..p6
    assert m["vs.by_category.a.win_rate"] == wilson_interval(1, 2).to_dict()
    assert m["vs.by_category.b.win_rate"]["value"] == pytest.approx(1.5 / 4)
    recs = {r["prompt"]: r for r in _items(tmp_path, "vs")}
    assert recs["p3"]["why"] == "order-inconsistent" and recs["p4"]["why"] == "identical"
    assert recs["p1"]["p_win"] == 1.0 and "error" in recs["p5"]


def test_a_judge_crash_is_scored_a_loss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p1"}, {"prompt": "boom"}])
    Stub(monkeypatch, lambda model, p, n: [model] if p == "boom"
         else ["good" if model == "stub" else "meh"])
    m = _run(tmp_path, _suite(tmp_path, [{**JUDGE_TASK, "name": "vs"}]))
    assert m["vs.win_rate"] == wilson_interval(1, 2).to_dict()  # p1 won; boom: a loss
    recs = {r["prompt"]: r for r in _items(tmp_path, "vs")}
    assert "judge blew up" in recs["boom"]["error"] and recs["boom"]["outcome"] == "loss"
    assert m["vs.errors"] == 1
