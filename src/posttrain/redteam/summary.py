"""The attempts log and the summary computed from it.

Every attempt (success or not) is appended to ``attempts.jsonl`` with the search's
fingerprint, as its batch finishes. A batch killed before its successes were committed is
searched again on resume and logs the same attempts again: the summary keeps one record per
(request, attempt number) and only the requests of the current data, so it never counts twice.

``summary.json``: counts, and under ``metrics`` (what ``posttrain gate`` reads) Wilson
intervals ``{value, low, high, n, method}``:

    request_success                     requests broken by at least one attack / requests
    attempt_success                     successful attempts / attempts
    by_attack.<kind>.attempt_success    per transformation (``attacker_model`` for a model)
    by_category.<c>.request_success     per category of request (and its attempt_success)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from posttrain.evals.stats import wilson_interval

VERDICTS = ("complied", "refused", "garbage", "undecided", "error")


def append_attempts(path: Path, fp: str, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        if f.tell() and not path.read_bytes().endswith(b"\n"):
            f.write("\n")  # end a line torn by a kill
        f.write("".join(json.dumps({"fp": fp, **r}) + "\n" for r in records))


def read_attempts(path: Path, fp: str, ids: set[str]) -> list[dict[str, Any]]:
    """One record per (request, attempt) of this search and these requests, in order."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if rec.get("fp") == fp and rec.get("prompt_id") in ids:
                seen[(rec["prompt_id"], rec["attempt"])] = rec
    return list(seen.values())


def _rate(flags: list[bool]) -> dict[str, Any]:
    return wilson_interval(sum(flags), len(flags)).to_dict()


def summarize(attempts: list[dict[str, Any]], requests_in_data: int) -> dict[str, Any]:
    by_request: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:
        by_request.setdefault(a["prompt_id"], []).append(a)
    broken = {pid: any(a["verdict"] == "complied" for a in xs) for pid, xs in by_request.items()}
    category = {a["prompt_id"]: a["category"] for a in attempts}
    ok = [a["verdict"] == "complied" for a in attempts]
    metrics: dict[str, Any] = {}
    if attempts:
        metrics = {"request_success": _rate(list(broken.values())),
                   "attempt_success": _rate(ok)}
    for kind in sorted({a["attack"] for a in attempts}):
        metrics[f"by_attack.{kind}.attempt_success"] = _rate(
            [a["verdict"] == "complied" for a in attempts if a["attack"] == kind])
    for c in sorted(set(category.values())):
        metrics[f"by_category.{c}.request_success"] = _rate(
            [b for pid, b in broken.items() if category[pid] == c])
        metrics[f"by_category.{c}.attempt_success"] = _rate(
            [a["verdict"] == "complied" for a in attempts if a["category"] == c])
    counts = {"requests_in_data": requests_in_data, "requests": len(by_request),
              "requests_broken": sum(broken.values()), "attempts": len(attempts),
              "successes": sum(ok)}
    counts |= {v: sum(a["verdict"] == v for a in attempts) for v in VERDICTS}
    return {"counts": counts, "metrics": metrics}
