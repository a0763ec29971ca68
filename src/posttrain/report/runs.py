"""Reading what a report is built from: one run directory, or a pipeline of them.

The schemas (``stage.json``, ``pipeline.json``) are documented in ``posttrain.report`` and
docs/report.md. A single run without ``stage.json`` gets its summary from the last values
in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError

# Summary rows for a run without stage.json: every eval/ key, then these when logged.
HEADLINE_KEYS = (
    "train/loss", "reward/mean", "reward/accuracy", "rewards/accuracies", "rewards/margins",
    "rm/accuracy", "dpo/saturated_frac", "dpo/misordered_frac", "simpo/saturated_frac",
    "orpo/saturated_frac", "rm/saturated_frac", "grpo/zero_std_frac", "grpo/kl",
    "objective/kl", "objective/score", "completions/mean_length", "sft/token_accuracy",
)

# The config class named in config.yaml's first line -> the command (DPOConfig: its loss).
_CONFIG_KINDS = {"SFTConfig": "sft", "RMConfig": "rm", "GRPOConfig": "grpo", "PPOConfig": "ppo"}
_METRIC_KINDS = (("grpo/", "grpo"), ("ppo/", "ppo"), ("kto/", "kto"), ("orpo/", "orpo"),
                 ("simpo/", "simpo"), ("dpo/", "dpo"), ("rm/", "rm"), ("sft/", "sft"))


class NotARunError(PosttrainError):
    """The directory holds neither a run nor a pipeline of runs."""


@dataclass
class Stage:
    """One column of the report: a run directory and its summary."""

    name: str
    kind: str = "run"
    status: str = "done"
    seconds: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    dir: Path | None = None  # None: the stage has not written its directory (yet)
    error: str | None = None
    evaluates: str | None = None  # an eval stage: the stage whose model it evaluated
    eval_dirs: list[Path] = field(default_factory=list)  # eval stages merged into this one

    @classmethod
    def from_dict(cls, d: dict[str, Any], run_dir: Path | None = None) -> Stage:
        """From ``stage.json``'s object (or a demo stage dict: name + metrics)."""
        seconds = d.get("seconds")
        return cls(name=str(d["name"]), kind=str(d.get("kind") or "run"),
                   status=str(d.get("status") or "done"),
                   seconds=float(seconds) if isinstance(seconds, int | float) else None,
                   metrics=dict(d.get("metrics") or {}), dir=run_dir,
                   error=str(d["error"]) if d.get("error") else None,
                   evaluates=str(d["evaluates"]) if d.get("evaluates") else None)


@dataclass
class Source:
    """What ``build_report`` renders: a title, the root it writes into, the stages."""

    title: str
    root: Path
    stages: list[Stage]
    pipeline: bool


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn or bad line (a run killed mid-write) is skipped: a report
    of a crashed run is exactly when one is wanted."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PosttrainError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise PosttrainError(f"{path}: expected a JSON object")
    return data


def is_run_dir(path: Path) -> bool:
    return any((path / f).exists() for f in ("metrics.jsonl", "stage.json", "config.yaml"))


def run_kind(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    """The command that made the run: from config.yaml's header, else its metric names."""
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        text = cfg.read_text(errors="replace")
        m = re.match(r"# Resolved (\w+)", text)
        if m and m.group(1) in _CONFIG_KINDS:
            return _CONFIG_KINDS[m.group(1)]
        loss = re.search(r"^loss: (\w+)", text, re.M)
        if m and m.group(1).endswith("Config") and loss:  # the DPO family: its loss
            return loss.group(1)
    keys = {k for r in rows for k in r}
    for prefix, kind in _METRIC_KINDS:
        if any(k.startswith(prefix) for k in keys):
            return kind
    return "run"


def last_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each key's last finite value over the rows (a key may be logged only at eval steps)."""
    out: dict[str, float] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[k] = v
    return out


def summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """A run's summary column: every eval/ metric and the headline keys (last values), and
    ``steps``; a handful of rows rather than every metric the recipe logs."""
    last = last_values(rows)
    metrics = {k: v for k, v in last.items() if k.startswith("eval/")}
    metrics.update({k: last[k] for k in HEADLINE_KEYS if k in last})
    if rows:
        metrics["steps"] = int(rows[-1].get("step", 0))
    return metrics


def summarize_run(run_dir: Path, name: str | None = None) -> Stage:
    """A stage from a bare run directory (no stage.json): ``summary_metrics``."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    metrics = summary_metrics(rows)
    times = [r["time"] for r in rows if isinstance(r.get("time"), int | float)]
    seconds = times[-1] - times[0] if len(times) > 1 else None
    status = "done" if (run_dir / "final").is_dir() else "incomplete"
    return Stage(name or run_dir.name, run_kind(run_dir, rows), status, seconds, metrics,
                 run_dir)


def load_stage(run_dir: Path, name: str | None = None) -> Stage:
    """``stage.json`` when the pipeline wrote one, else a summary of the metrics."""
    if (run_dir / "stage.json").exists():
        d = _read_json(run_dir / "stage.json")
        if "name" not in d:
            d["name"] = name or run_dir.name
        return Stage.from_dict(d, run_dir)
    return summarize_run(run_dir, name)


def _pipeline_names(root: Path) -> list[str]:
    data = _read_json(root / "pipeline.json")
    names = data.get("stages")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise PosttrainError(f"{root / 'pipeline.json'}: 'stages' must be a list of stage names")
    return names


def _created(run_dir: Path) -> float:
    # Its oldest file's time: metrics.jsonl changes all run long, config.yaml never again.
    return min((p.stat().st_mtime for p in run_dir.iterdir()), default=0.0)


def _stage_dirs(root: Path) -> list[Path]:
    """Without pipeline.json: the run directories under ``root``, oldest first."""
    dirs = [d for d in root.iterdir() if d.is_dir() and is_run_dir(d)]
    return sorted(dirs, key=lambda d: (_created(d), d.name))


def merge_evaluations(stages: list[Stage]) -> list[Stage]:
    """An eval stage's results join the column of the stage whose model it evaluated (its
    samples too), so a pipeline's table has one column per model."""
    by_name = {s.name: s for s in stages}
    kept = []
    for s in stages:
        target = by_name.get(s.evaluates or "")
        if target is None or target is s:
            kept.append(s)
            continue
        target.metrics.update(s.metrics)
        if s.dir is not None:
            target.eval_dirs.append(s.dir)
        if s.status != "done" and target.status == "done":
            target.status = s.status
    return kept


def load_source(path: str | Path) -> Source:
    """A pipeline directory (``pipeline.json``, or subdirectories that are runs) or a run."""
    root = Path(path)
    if not root.is_dir():
        raise NotARunError(f"{root}: no such directory")
    if (root / "pipeline.json").exists():
        meta = _read_json(root / "pipeline.json")
        title = str(meta.get("name") or Path(str(meta.get("file") or root.name)).stem)
        stages = []
        for name in _pipeline_names(root):
            d = root / name
            stages.append(load_stage(d, name) if d.is_dir() and is_run_dir(d)
                          else Stage(name, status="pending"))
        return Source(title, root, merge_evaluations(stages), pipeline=True)
    if is_run_dir(root):
        return Source(root.resolve().name, root, [load_stage(root)], pipeline=False)
    dirs = _stage_dirs(root)
    if dirs:
        return Source(root.resolve().name, root, [load_stage(d) for d in dirs], pipeline=True)
    raise NotARunError(f"{root} is not a run directory: it has no metrics.jsonl, config.yaml, "
                       f"stage.json or pipeline.json, and no subdirectory that does")
