"""``instruments.jsonl``: the per-example numbers behind the seed's two instruments.

``metrics.jsonl`` holds scalars (means, fractions); a histogram needs the values themselves.
Recipes append rows here (rank 0 only), and the report reads them. Rows:

    {"step": N, "kind": "margins", "loss": "dpo", "split": "train", "n": 128,
     "margins": [...]}          preference recipes, once at the end of training: the margin
                                each pair's loss feeds its sigmoid (INSTRUMENT 5.1)
    {"step": N, "kind": "advantages", "n": 64, "adv": [...]}
                                GRPO, every logged step: the advantages of the completions
                                the step trained on, as a sorted sketch (INSTRUMENT 5.2)

``step`` is the optimizer step of the ``metrics.jsonl`` row it belongs to, so a resumed run
drops the rows after its checkpoint exactly as it does for ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTRUMENTS = "instruments.jsonl"
SKETCH_SIZE = 256  # values kept per row: enough for a histogram, small for a long run


def sketch(values: Sequence[float], k: int = SKETCH_SIZE) -> list[float]:
    """``values`` sorted, and above ``k`` of them thinned to ``k`` evenly spaced order
    statistics (min and max kept): the same distribution at a coarser resolution."""
    xs = sorted(float(v) for v in values if math.isfinite(float(v)))
    if len(xs) > k:
        xs = [xs[round(i * (len(xs) - 1) / (k - 1))] for i in range(k)]
    return [round(x, 5) for x in xs]


def append_row(run_dir: str | Path, row: dict[str, Any]) -> None:
    """Append one row to ``run_dir/instruments.jsonl`` (callers write on rank 0 only)."""
    with open(Path(run_dir) / INSTRUMENTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(run_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """The rows of one ``kind``, in file order; none when the file is absent. A torn last
    line (a run killed mid-write) is skipped, not an error: the report must still build."""
    path = Path(run_dir) / INSTRUMENTS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("kind") == kind:
            rows.append(row)
    return rows
