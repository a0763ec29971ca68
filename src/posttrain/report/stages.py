"""The stage table: stages as columns, metrics as rows, values formatted short.

The same table three ways: a rich table that fits a 100-column terminal (``print_summary``;
more stages than fit are split into several tables), markdown, and the rows the HTML report
renders. ``write_report`` is the demo's writer: ``report.json`` + ``report.md`` + the table.

``report.json`` is ``{"stages": [{"name": ..., "metrics": {...}}, ...], ...extra}`` with
rates as fractions in [0, 1]; later stages append themselves under their own names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from posttrain.report.runs import Stage, load_source

WIDTH = 100  # the terminal the summary must fit
_LABEL_MAX, _NAME_MAX, _CELL_MAX = 26, 14, 10  # column widths (characters)
_RATE_NAMES = ("accuracy", "accuracies", "format_rate", "ended_turn_rate")
_RATE_SUFFIXES = ("_rate", "_frac", "accuracy")

StageLike = Stage | dict[str, Any]


def is_rate(key: str) -> bool:
    """A fraction in [0, 1], shown as a percentage (by the metric naming conventions)."""
    leaf = key.rsplit("/", 1)[-1]
    return leaf in _RATE_NAMES or leaf.endswith(_RATE_SUFFIXES)


def _short_number(v: float) -> str:
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1e-3 or v == 0:
        return f"{v:.3g}"
    return f"{v:.1e}"


def fmt(key: str, value: Any) -> str:
    """A cell: at most ~8 characters, so that a stage column stays narrow."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if is_rate(key) and 0 <= value <= 1:
            return f"{100 * value:.3g}%"
        return _short_number(float(value)) if isinstance(value, float) or abs(value) >= 1e4 \
            else str(value)
    text = str(value)
    return text if len(text) <= _CELL_MAX else text[: _CELL_MAX - 1] + "…"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s < 60:
        return f"{s:.0f}s" if s >= 9.5 else f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def as_stages(stages: Sequence[StageLike]) -> list[Stage]:
    return [s if isinstance(s, Stage) else Stage.from_dict(s) for s in stages]


def table_rows(stages: Sequence[StageLike]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(stage names, [(row label, one cell per stage)]): kind, status and time first (where
    they say anything), then every metric in order of first appearance."""
    st = as_stages(stages)
    rows: list[tuple[str, list[str]]] = []
    if any(s.kind != "run" for s in st):
        rows.append(("kind", [s.kind if s.kind != "run" else "" for s in st]))
    if any(s.status != "done" for s in st):
        rows.append(("status", [s.status for s in st]))
    if any(s.seconds is not None for s in st):
        rows.append(("time", [fmt_seconds(s.seconds) for s in st]))
    keys = list(dict.fromkeys(k for s in st for k in s.metrics))
    rows += [(k, [fmt(k, s.metrics.get(k)) for s in st]) for k in keys]
    return [s.name for s in st], rows


def markdown_table(stages: Sequence[StageLike]) -> str:
    names, rows = table_rows(stages)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def _column_width(name: str, cells: list[str]) -> int:
    return max(min(len(name), _NAME_MAX), *(min(len(c), _CELL_MAX) for c in cells))


def _column_groups(widths: list[int], label_w: int, width: int) -> list[list[int]]:
    """Stage indices per table, as many per table as fit ``width`` (each column costs its
    text plus 3: padding and the separator)."""
    groups: list[list[int]] = [[]]
    used = label_w + 3
    for i, w in enumerate(widths):
        if groups[-1] and used + w + 3 > width:
            groups.append([])
            used = label_w + 3
        groups[-1].append(i)
        used += w + 3
    return groups


def summary_tables(stages: Sequence[StageLike], title: str | None = None,
                   width: int = WIDTH) -> list[Table]:
    """Rich tables, stages as columns, each at most ``width`` columns wide."""
    names, rows = table_rows(stages)
    label_w = min(max([len("metric"), *(len(label) for label, _ in rows)]), _LABEL_MAX)
    widths = [_column_width(n, [cells[i] for _, cells in rows]) for i, n in enumerate(names)]
    tables = []
    for n, group in enumerate(_column_groups(widths, label_w, width)):
        table = Table(title=title if n == 0 else None, box=box.SIMPLE_HEAD, show_edge=False,
                      pad_edge=False, title_justify="left")
        table.add_column("metric", max_width=label_w, no_wrap=True, overflow="ellipsis",
                         style="bold")
        for i in group:
            table.add_column(names[i], justify="right", no_wrap=True, overflow="ellipsis",
                             max_width=widths[i])
        for label, cells in rows:
            table.add_row(label, *(cells[i] for i in group))
        tables.append(table)
    return tables


def print_summary(source: str | Path | Sequence[StageLike], title: str | None = None,
                  console: Console | None = None) -> None:
    """Print the stage table for a run or pipeline directory, or for stage dicts/``Stage``s
    (``{"name", "metrics", ...}``, as in ``stage.json``); fits 100 columns."""
    if isinstance(source, str | Path):
        src = load_source(source)
        stages, title = src.stages, title or src.title
    else:
        stages = list(source)
    console = console or Console()
    for table in summary_tables(stages, title, width=min(console.width, WIDTH)):
        console.print(table)


def write_report(out_dir: Path, title: str, stages: list[dict[str, Any]],
                 sections: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 console: Console | None = None) -> None:
    """Write report.json and report.md under ``out_dir`` and print the table."""
    payload = {"stages": stages, **(extra or {})}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    body = [f"# {title}", "", markdown_table(stages), ""]
    for heading, text in (sections or {}).items():
        body += [f"## {heading}", "", text, ""]
    (out_dir / "report.md").write_text("\n".join(body))
    print_summary(stages, title, console)
