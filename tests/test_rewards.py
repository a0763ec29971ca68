"""Rewards and verifiers: EQ 5.7, each verifier, composition, contained failures, tasks."""

from __future__ import annotations

import threading
import time

import pytest

from posttrain.rewards.base import RewardSet
from posttrain.rewards.registry import auto_reward_names, build_reward
from posttrain.rewards.verifiers import (
    CountdownCheck,
    ExactMatch,
    MathVerify,
    NumericMatch,
    ReasoningGymScore,
    RegexFormat,
    VerifierReward,
    rlvr_reward,
)
from posttrain.tasks.registry import build_task_rows
from posttrain.tasks.rl import rg_rows

GOOD = "<think>7 and 5 make 12</think> <answer>12</answer>"


def test_eq57_worked_example_is_1_point_2():
    # r = 1[verify] + lambda_fmt * 1[format ok] = 1 + 0.2 * 1
    reward = rlvr_reward(NumericMatch(), lambda_fmt=0.2)
    completions = [GOOD, "<answer>12</answer>", "<think>x</think><answer>3</answer>"]
    out = reward(["q"] * 3, completions, answer=["12"] * 3)
    assert out.total.tolist() == pytest.approx([1.2, 1.0, 0.2])
    assert out.metrics["reward/numeric/mean"] == pytest.approx(2 / 3)


def test_verifiers():
    assert NumericMatch().verify("so 0.1+0.2 = 0.30000000000000004", "0.3")[0] == 1.0
    assert NumericMatch(abs_tol=0.5, rel_tol=0).verify("about 3.4", 3)[0] == 1.0
    assert NumericMatch().verify("no number here", "3")[0] == 0.0
    assert ExactMatch().verify("<answer> Paris </answer>", "paris")[0] == 1.0
    assert ExactMatch(case_sensitive=True).verify("<answer>paris</answer>", "Paris")[0] == 0.0
    assert RegexFormat().verify(GOOD)[0] == 1.0
    assert RegexFormat().verify("12")[0] == 0.0
    assert RegexFormat(r"^\d+$").verify("12")[0] == 1.0


def test_math_verify_off_the_main_thread():
    # math-verify's default signal timeouts raise off the main thread; ours are disabled.
    got: list = []
    m = MathVerify()
    t = threading.Thread(target=lambda: got.extend([
        m.verify("<answer>$\\frac{1}{2}$</answer>", "0.5")[0],
        m.verify("the answer is \\boxed{2x+2}", "2(x+1)")[0],
        m.verify("\\boxed{3}", "4")[0]]))
    t.start()
    t.join()
    assert got == [1.0, 1.0, 0.0]


def test_reasoning_gym_scorer():
    rows = rg_rows("leg_counting", size=4, seed=1)
    e = rows[0]["rg_entry"]
    rg = ReasoningGymScore()
    assert rg.verify(f"<answer>{e['answer']}</answer>", e)[0] == 1.0
    assert rg.verify("<answer>-1</answer>", e)[0] == 0.0
    test_q = {r["prompt"][0]["content"] for r in rg_rows("leg_counting", "test", size=4, seed=1)}
    assert not test_q & {r["prompt"][0]["content"] for r in rows}


def test_countdown_task_and_verifier():
    rows = build_task_rows("countdown", size=300, seed=0)
    test = build_task_rows("countdown", split="test", size=50, seed=0)
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    assert not {key(r) for r in rows} & {key(r) for r in test}
    c = CountdownCheck()
    r = rows[0]
    assert c.verify(f"<answer>{r['solution']}</answer>", r)[0] == 1.0
    assert c.verify("<answer>1 + 1</answer>", r)[0] == 0.0
    assert c.verify("<answer>__import__('os').getcwd()</answer>", r)[0] == 0.0
    reward = build_reward("countdown")
    assert reward(["p"], [f"<answer>{r['solution']}</answer>"], numbers=[r["numbers"]],
                  target=[r["target"]]) == [1.0]


def _boom(prompts, completions, **kw):
    raise RuntimeError("reward bug")


def _hang(prompts, completions, **kw):
    time.sleep(5)
    return [1.0] * len(completions)


def _half(prompts, completions, **kw):
    return [0.5 if "a" in c else None for c in completions]


def test_reward_set_contains_errors_and_timeouts_and_weights():
    rs = RewardSet([_half, _boom, _hang], [2.0, 1.0, 1.0], timeout_s=0.2, on_error=-1.0)
    t0 = time.perf_counter()
    out = rs(["p", "p"], ["a", "b"])
    assert time.perf_counter() - t0 < 2.0  # the hung call was abandoned
    # 2 * 0.5 + (-1) + (-1) for "a"; None counts 0: 0 - 1 - 1 for "b"
    assert out.total.tolist() == pytest.approx([-1.0, -2.0])
    assert out.metrics["reward/_boom/errors"] == 1.0
    assert out.metrics["reward/_hang/timeouts"] == 1.0
    assert out.metrics["reward/_half/none_frac"] == 0.5
    rs(["p"], ["a"])
    assert rs.totals["_boom/errors"] == 2  # counted over the run


def test_verifier_reward_contains_per_row_errors():
    class Flaky:
        name = "flaky"

        def verify(self, completion, truth):
            if completion == "bad":
                raise ValueError("cannot parse")
            return 1.0, "ok"

    fn = VerifierReward(Flaky())
    assert fn(["p"] * 3, ["ok", "bad", "ok"], answer=["1", "1", None]) == [1.0, 0.0, None]
    assert fn.last_stats["verify/flaky/errors"] == 1.0


def test_auto_reward_names():
    assert auto_reward_names("task:arithmetic", [{"prompt": "q", "answer": "3"}]) == ["numeric"]
    assert auto_reward_names("data.jsonl", [{"prompt": "q", "answer": "3"}]) == ["math"]
    assert auto_reward_names("task:countdown", [{"prompt": "q"}]) == ["countdown"]
    assert auto_reward_names("task:toy_code", [{"prompt": "q", "tests": "assert 1"}]) == ["code"]
    assert auto_reward_names("rg:leg_counting", [{"prompt": "q"}]) == ["rg"]


def test_pass_rate_judges_each_row_by_its_own_verifier():
    """A mixture of a math task and a code task: each verifier is None on the other's rows,
    which must not count as failures."""
    from posttrain.rewards.scoring import pass_rate

    def verifier(task):  # noqa: ANN001, ANN202
        def fn(prompts, completions, **_):  # noqa: ANN001, ANN202
            return [None if p != task else float(c == "ok")
                    for p, c in zip(prompts, completions, strict=True)]
        return fn

    numeric, code = verifier("math"), verifier("code")

    numeric.__name__, code.__name__ = "numeric", "code"
    out = RewardSet([numeric, code])(["math", "math", "code", "code", "code", "chat"],
                                     ["ok", "no", "ok", "ok", "no", "ok"])
    assert pass_rate(out, ["numeric", "code"]) == (pytest.approx(3 / 5), 5)  # "chat": neither
    assert pass_rate(out, ["numeric"]) == (pytest.approx(1 / 2), 2)
    assert pass_rate(out, []) == (pytest.approx(float("nan"), nan_ok=True), 0)
