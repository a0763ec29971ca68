"""Stage reports: a terminal table, ``report.md`` and ``report.json``.

``report.json`` is ``{"stages": [{"name": ..., "metrics": {...}}, ...], ...extra}`` with
rates as fractions in [0, 1]; later stages append themselves under their own names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

_RATE_KEYS = ("format_rate", "accuracy", "ended_turn_rate")


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1%}" if key in _RATE_KEYS or key.endswith("_rate") else f"{value:.3g}"
    return str(value)


def stage_table(stages: list[dict[str, Any]], title: str) -> Table:
    keys = list(dict.fromkeys(k for s in stages for k in s["metrics"]))
    table = Table(title=title)
    table.add_column("stage")
    for k in keys:
        table.add_column(k, justify="right")
    for s in stages:
        table.add_row(s["name"], *(_fmt(k, s["metrics"].get(k, "")) for k in keys))
    return table


def markdown_table(stages: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for s in stages for k in s["metrics"]))
    lines = ["| stage | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for s in stages:
        lines.append(f"| {s['name']} | " + " | ".join(_fmt(k, s["metrics"].get(k, ""))
                                                  for k in keys) + " |")
    return "\n".join(lines)


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
    (console or Console()).print(stage_table(stages, title))
