"""Stage kinds: what a pipeline stage can be.

A kind is its config class (the same keys as its command), a run function that does the
stage's work and returns the model directory it produced, where that directory will be (so
later stages can refer to it before it exists) and a summary of its metrics for
``stage.json``. Every training command of ``posttrain.commands.TRAIN_COMMANDS`` is a kind;
``eval`` is one more; ``register_kind`` adds others (Constitutional AI, a release gate)::

    register_kind("judge", StageKind("AI-judged preference labels", judge_config_cls,
                                     run_judge, output=lambda run_dir: run_dir))

Register a kind in the module that defines its config class: worker processes import that
module before running the kind's stages, so they know it too.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.commands import TRAIN_COMMANDS
from posttrain.errors import ConfigError

# Wall-clock figures say how fast a run was, not what it reached.
_NOT_RESULTS = ("time", "perf/")


def final_dir(run_dir: Path) -> Path:
    """Where a training run puts its model: ``run_dir/final``."""
    return run_dir / "final"


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """A training run's summary for ``stage.json``: its held-out (``eval/``) metrics and a few
    headline ones, each key's last logged value (``report.runs.summary_metrics``)."""
    from posttrain.report.runs import read_jsonl, summary_metrics

    return summary_metrics(read_jsonl(run_dir / "metrics.jsonl"))


@dataclass(frozen=True)
class StageKind:
    doc: str
    config_cls: Callable[[], type]  # lazy: importing a recipe costs seconds
    run: Callable[[Any], Any]  # cfg -> the model directory the stage produced
    summary: Callable[[Path], dict[str, Any]] = last_metrics  # run dir -> metrics
    output: Callable[[Path], Path] = final_dir  # run dir -> model dir, known before running
    required: tuple[str, ...] = ()  # keys whose default cannot run (a training stage's data)


_REGISTERED: dict[str, StageKind] = {}


def register_kind(name: str, kind: StageKind) -> None:
    """Make ``kind: NAME`` usable in pipeline files (a later registration replaces one)."""
    _REGISTERED[name] = kind


def _training_kinds() -> dict[str, StageKind]:
    return {name: StageKind(cmd.doc, cmd.config_cls, cmd.run, required=("data",))
            for name, cmd in TRAIN_COMMANDS.items()}


def _eval_kind() -> StageKind:
    from posttrain.commands import COMMANDS
    from posttrain.evals.run import read_metrics

    cmd = COMMANDS["eval"]
    return StageKind(cmd.doc, cmd.config_cls, cmd.run, summary=read_metrics,
                     output=lambda run_dir: run_dir)


def _gate_kind() -> StageKind:
    from posttrain.evals import gate_stage

    return StageKind("release gate: thresholds on an eval stage's results; publishes the "
                     "model when all pass, stops the pipeline when one fails",
                     lambda: gate_stage.GateStageConfig, gate_stage.run_gate_stage,
                     summary=gate_stage.read_verdict, output=lambda run_dir: run_dir)


def stage_kinds() -> dict[str, StageKind]:
    """Every kind by name: the training commands, ``eval``, ``gate``, then registered kinds."""
    return {**_training_kinds(), "eval": _eval_kind(), "gate": _gate_kind(), **_REGISTERED}


def get_kind(name: str) -> StageKind:
    known = stage_kinds()
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown stage kind {name!r}{hint} (kinds: {', '.join(known)})")
    return known[name]
