"""Every recipe computes what it computed when ``tests/golden/runs.json`` was recorded.

Each golden run (``golden_runs.py``: 20 steps of sft, rm, the DPO family, GRPO and its
variants, PPO, with and without LoRA) is replayed and its logged metrics and final weights are
compared with the record. On the CPU and torch build that recorded them the comparison is
bitwise: the same operations in the same order give the same bits. Elsewhere a different
kernel (another ISA's GEMM blocking) rounds differently, so metrics are compared to a relative
1e-3 and the weights (whose digest changes with any rounding) are not compared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from golden_runs import GOLDEN_FILE, RUNS, machine, order, run_golden

GOLDEN = json.loads(GOLDEN_FILE.read_text())


@pytest.fixture(scope="module")
def finals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("golden")


def _same(a: object, b: object, exact: bool) -> bool:
    if isinstance(a, float) and isinstance(b, float | int):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b if exact else math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6)
    return a == b


@pytest.mark.parametrize("name", order(list(RUNS)))
def test_golden_run(name: str, workdir: Path, finals: dict[str, Path]) -> None:
    need = RUNS[name].needs
    if need and need not in finals:
        run_golden(need, workdir, finals)
    got = run_golden(name, workdir, finals)
    want = GOLDEN["runs"][name]
    exact = GOLDEN["machine"] == machine()
    assert len(got["metrics"]) == len(want["metrics"]), "logged a different number of rows"
    for row_got, row_want in zip(got["metrics"], want["metrics"], strict=True):
        assert sorted(row_got) == sorted(row_want), f"step {row_want.get('step')}: keys differ"
        bad = {k: (row_got[k], row_want[k]) for k in row_want
               if not _same(row_got[k], row_want[k], exact)}
        assert not bad, f"step {row_want.get('step')}: (got, golden) {bad}"
    if exact:
        assert got["weights"] == want["weights"], "final weights differ from the golden run's"
