"""Run reports: ``report.html`` (self-contained), ``report.md``, ``plots/*.png``, and a
terminal summary, for one run directory or a pipeline of them (docs/report.md).

    from posttrain.report import build_report, print_summary
    build_report("runs/dpo")          # -> runs/dpo/report.html
    print_summary("runs/dpo")         # stages as columns, metrics as rows, <= 100 columns

A **run directory** is what every training command writes: ``config.yaml``,
``metrics.jsonl``, ``final/``; optionally ``instruments.jsonl`` (written by the preference
and GRPO recipes: ``report/instruments.py``) and ``samples.jsonl`` (any writer; one JSON
object per line with ``prompt`` and ``response`` (strings or message lists) and any other
scalar fields, e.g. ``reward``, ``correct``).

A **pipeline directory** holds one run directory per stage, named after the stage, and

``pipeline.json`` (at the top; the stage order)::

    {"stages": ["base", "sft", "rm", "dpo", "ppo", "grpo"],   # required
     "name": "demo",                # optional: the report's title
     "file": "demo.yaml"}           # optional: the pipeline file (title: its stem)

``<stage>/stage.json`` (in each stage's run directory; written by the pipeline runner)::

    {"name": "sft",           # the stage's name (= its directory's name)
     "kind": "sft",           # the command it ran: sft, pretrain, rm, dpo, kto, orpo, simpo,
                              #   grpo, ppo, eval, ...
     "status": "done",        # done | cached (skipped: already complete) | failed |
                              #   running | pending
     "seconds": 41.2,         # wall-clock seconds of the stage, or null
     "metrics": {"eval/accuracy": 0.62, "kl_to_sft": 2.0},
                              # the summary column: numbers (or null / short strings);
                              #   keys ending in accuracy, _rate or _frac are fractions in
                              #   [0, 1] and print as percentages; a handful of keys
                              #   (runs.summary_metrics picks them from metrics.jsonl rows)
     "error": "..."}          # optional: one line, for a failed stage

Any other key is ignored. A stage listed in ``pipeline.json`` without a directory shows as
pending. Without ``stage.json`` (a single run, or a stage not yet finished) the summary is
derived from ``metrics.jsonl`` by ``runs.summary_metrics``: every ``eval/`` metric and a
few headline metrics (``runs.HEADLINE_KEYS``), last logged values. Without
``pipeline.json``, the subdirectories that are runs are the stages, oldest first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from posttrain.report.build import build_report
    from posttrain.report.runs import NotARunError, Stage, load_source
    from posttrain.report.stages import print_summary, write_report

# Imported on first use: recipes import ``report.instruments`` and must not pay for
# matplotlib (about a second) on every run.
_EXPORTS = {"build_report": "build", "NotARunError": "runs", "Stage": "runs",
            "load_source": "runs", "print_summary": "stages", "write_report": "stages"}
__all__ = ["NotARunError", "Stage", "build_report", "load_source", "print_summary",
           "write_report"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'posttrain.report' has no attribute {name!r}")
    return getattr(importlib.import_module(f"posttrain.report.{_EXPORTS[name]}"), name)
