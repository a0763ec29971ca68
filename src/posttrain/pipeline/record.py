"""What a pipeline writes about itself: ``pipeline.json`` at the top, ``stage.json`` per stage.

The whole schema is here, so reports read it from one place::

    pipeline.json  {"file": "pipe.yaml", "stages": ["sft", "dpo"],
                    "resolved": {"sft": {<resolved config>}, "dpo": {...}}}
    stage.json     {"name": "dpo", "kind": "dpo", "status": "running" | "done" | "failed",
                    "fingerprint": "3f2a...", "inputs": {"sft": "<sft's fingerprint>"},
                    "seconds": 12.3 | null, "metrics": {<last value of each metric>},
                    "error": "<message>" (failed only),
                    "evaluates": "sft" (an eval or gate stage: whose model it
                                        evaluated or gated)}

Both are written atomically (a temporary file renamed into place), so a kill at any moment
leaves the previous version or the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from posttrain.pipeline.plan import Plan, Stage

PIPELINE_FILE = "pipeline.json"
STAGE_FILE = "stage.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_pipeline(plan: Plan) -> None:
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan.output_dir / PIPELINE_FILE, {
        "file": plan.file, "stages": plan.names,
        "resolved": {s.name: s.config for s in plan.stages},
    })


def write_stage(plan: Plan, stage: Stage, status: str, seconds: float | None = None,
                metrics: dict[str, Any] | None = None, error: str | None = None) -> None:
    record: dict[str, Any] = {
        "name": stage.name, "kind": stage.kind, "status": status,
        "fingerprint": stage.fingerprint,
        "inputs": {name: plan[name].fingerprint for name in stage.inputs},
        "seconds": None if seconds is None else round(seconds, 1),
        "metrics": metrics or {},
    }
    if error is not None:
        record["error"] = error
    evaluated = _evaluated(plan, stage)
    if evaluated is not None:
        record["evaluates"] = evaluated
    write_json(stage.run_dir / STAGE_FILE, record)


def _evaluated(plan: Plan, stage: Stage) -> str | None:
    """For an eval or gate stage, the stage whose model it evaluates or gates (its ``model``
    is that output): the report shows its results in that model's column."""
    if stage.kind not in ("eval", "gate"):
        return None
    return next((n for n in stage.inputs if str(plan[n].output) == stage.config.get("model")),
                None)


def read_stage(run_dir: Path) -> dict[str, Any] | None:
    """The stage's record, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((run_dir / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_done(stage: Stage) -> bool:
    """Finished with this very fingerprint, and its model is still there."""
    rec = read_stage(stage.run_dir)
    return (rec is not None and rec.get("status") == "done"
            and rec.get("fingerprint") == stage.fingerprint and stage.output.exists())
