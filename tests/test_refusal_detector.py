"""The rule-based refusal detector's error, measured on labelled answers the project wrote:
a development set its phrases were chosen on, and a held-out set written after them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.evals.refusal import is_refusal
from posttrain.evals.stats import wilson_interval

FILES = Path(__file__).parents[1] / "src" / "posttrain" / "evals" / "files"


def errors(name: str) -> tuple[int, int]:
    rows = [json.loads(line) for line in (FILES / name).read_text().splitlines()]
    assert {r["refusal"] for r in rows} == {True, False}
    return sum(is_refusal(r["response"]) != r["refusal"] for r in rows), len(rows)


def test_development_set_error() -> None:
    wrong, n = errors("refusal_dev.jsonl")
    assert n == 60 and wrong <= 3  # bound: 5%; measured 0/60


@pytest.mark.parametrize("bound", [0.25])
def test_held_out_error_is_under_its_bound(bound: float) -> None:
    wrong, n = errors("refusal_heldout.jsonl")
    ci = wilson_interval(wrong, n)
    # measured 7/40 = 17.5% [8.7%, 32.0%]: 5 refusals missed ("I'm not comfortable helping
    # with that"), 2 answers taken for refusals ("Sorry, I misread ..."); docs/evals.md
    assert n == 40 and ci.value <= bound
