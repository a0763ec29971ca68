"""Stage kinds: what a pipeline stage can be.

A kind is its config class (the same keys as its command), a run function that does the
stage's work and returns the model directory (or file) it produced, where that will be (so
later stages can refer to it before it exists), a summary of its metrics for ``stage.json``
and what an interrupted stage resumes from. Every command of ``posttrain.commands`` is a
kind: the training commands (output: ``final/``, resumed from the last checkpoint), ``eval``,
and every other one, a *data* command (``generate``, ``cai revise``, ...), whose output is
the rows file it writes and which continues its own rows when rerun (``data_kind``); ``gate``
is one more; ``register_kind`` adds others::

    register_kind("judge", StageKind("AI-judged preference labels", judge_config_cls,
                                     run_judge, output=lambda run_dir: run_dir))

Register a kind in the module that defines its config class: worker processes import that
module before running the kind's stages, so they know it too.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.commands import COMMANDS, TRAIN_COMMANDS, Command
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


def checkpoint_to_resume(run_dir: Path) -> str | None:
    """Where an interrupted training stage resumes: its newest intact checkpoint."""
    from posttrain.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return None if ckpt is None else f"from {ckpt.name}"


@dataclass(frozen=True)
class StageKind:
    doc: str
    config_cls: Callable[[], type]  # lazy: importing a recipe costs seconds
    run: Callable[[Any], Any]  # cfg -> the model directory (or file) the stage produced
    summary: Callable[[Path], dict[str, Any]] = last_metrics  # run dir -> metrics
    output: Callable[[Path], Path] = final_dir  # run dir -> model dir, known before running
    required: tuple[str, ...] = ()  # keys whose default cannot run (a training stage's data)
    # cfg -> its output, for kinds where the config decides it (data commands); else output
    output_of: Callable[[Any], Path] | None = None
    # run dir -> what an interrupted run of the kind continues from ("from step-3"), or None
    # when it has nothing to continue (it then runs from scratch); used for configs with resume
    resume_point: Callable[[Path], str | None] = checkpoint_to_resume
    # a resumed run continues its own output (resume=true, overwrite=false), where a training
    # run may find final/ already written (overwrite=true lets it finish)
    continues_output: bool = False

    def output_path(self, run_dir: Path, cfg: Any | None) -> Path:
        """Where the stage's output will be (``cfg``: its built config, None if invalid)."""
        if self.output_of is not None and cfg is not None:
            return self.output_of(cfg)
        return self.output(run_dir)


_REGISTERED: dict[str, StageKind] = {}


def register_kind(name: str, kind: StageKind) -> None:
    """Make ``kind: NAME`` usable in pipeline files (a later registration replaces one)."""
    _REGISTERED[name] = kind


def _training_kinds() -> dict[str, StageKind]:
    return {name: StageKind(cmd.doc, cmd.config_cls, cmd.run, required=("data",))
            for name, cmd in TRAIN_COMMANDS.items()}


def _eval_kind() -> StageKind:
    cmd = COMMANDS["eval"]
    return StageKind(cmd.doc, cmd.config_cls, cmd.run, summary=eval_summary,
                     output=lambda run_dir: run_dir)


def _gate_kind() -> StageKind:
    from posttrain.evals import gate_stage

    return StageKind("release gate: thresholds on an eval stage's results; publishes the "
                     "model when all pass, stops the pipeline when one fails",
                     lambda: gate_stage.GateStageConfig, gate_stage.run_gate_stage,
                     summary=gate_stage.read_verdict, output=lambda run_dir: run_dir)


# --- data commands -------------------------------------------------------------------------

_SUMMARY_FILE = "summary.json"  # a data command's own summary, beside its rows (redteam's)


def data_kind(cmd: Command) -> StageKind:
    """A data command as a stage kind: it writes rows in its run directory; its output is
    the rows file (``command_output``), its summary counts the rows (``rows_summary``), and a
    rerun continues the rows already written (the commands record finished batches in a
    ``<rows>.meta.json`` sidecar; ``generate/run.py``)."""
    return StageKind(cmd.doc, cmd.config_cls, cmd.run, summary=rows_summary,
                     output=lambda run_dir: run_dir, output_of=command_output,
                     resume_point=rows_to_resume, continues_output=True)


def command_output(cfg: Any) -> Path:
    """The file a data command's run returns: what its config's ``stage_output()`` says when
    it has one (a command whose result is not its rows file), else the config's ``path``
    (the rows file), else its ``output_dir``."""
    hook = getattr(cfg, "stage_output", None)
    if callable(hook):
        return Path(hook())
    path = getattr(cfg, "path", None)
    return Path(path) if isinstance(path, str | Path) else Path(cfg.output_dir)


def _sidecars(run_dir: Path) -> list[Path]:
    """The rows files a data command wrote in ``run_dir`` (each has a ``<file>.meta.json``,
    ``generate.run.meta_path``)."""
    return [m.with_name(m.name.removesuffix(".meta.json"))
            for m in sorted(run_dir.glob("*.meta.json"))]


def _meta(rows_file: Path) -> dict[str, Any]:
    """The rows file's sidecar: prompts done, and the command's counts (e.g. dropped pairs)."""
    from posttrain.generate.run import meta_path

    try:
        meta = json.loads(meta_path(rows_file).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _prompts_done(rows_file: Path) -> int:
    done = _meta(rows_file).get("prompts_done", 0)
    return done if isinstance(done, int) else 0


def rows_to_resume(run_dir: Path) -> str | None:
    """An interrupted data stage continues after the prompts its rows files finished."""
    done = sum(_prompts_done(f) for f in _sidecars(run_dir))
    return f"after the {done} prompts done" if done else None


def rows_summary(run_dir: Path) -> dict[str, Any]:
    """A data stage's ``stage.json`` metrics, under ``data/``: per rows file, the prompts
    done, rows written, prompts that gave no row (dropped: filtered out, judged a tie or
    inconsistently, an empty revision, ...), the counts the command keeps in the sidecar
    (``dropped_tie``, ``dropped_order-inconsistent``, ...), and what its rows carry (truncated
    answers, rewards, judge probabilities, revisions that changed the answer); plus the
    numbers of the command's own ``summary.json`` when it writes one. Several rows files:
    ``data/<stem>/``."""
    files = _sidecars(run_dir)
    out: dict[str, Any] = {}
    for f in files:
        prefix = "data/" if len(files) == 1 else f"data/{f.stem}/"
        out.update({prefix + k: v for k, v in _rows_stats(f).items()})
    summary = run_dir / _SUMMARY_FILE
    if summary.is_file():
        with contextlib.suppress(ValueError):  # a summary torn by a kill: rows still count
            doc = json.loads(summary.read_text())
            out.update(headline_metrics(doc.get("metrics", {}), "summary/"))
            out.update(_numbers({k: v for k, v in doc.items() if k != "metrics"}, "summary/"))
    return out


def headline_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers a stage's table row shows: an interval as its value; the breakdowns (any
    key with a ``by_...`` part: per category, per attack) stay in the eval's own files."""
    out: dict[str, float] = {}
    for key, v in metrics.items():
        if any(part.startswith("by_") for part in re.split(r"[./]", key)):
            continue
        if isinstance(v, dict) and isinstance(v.get("value"), int | float):
            v = v["value"]
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[prefix + key] = v
    return out


def eval_summary(run_dir: Path) -> dict[str, Any]:
    """An eval stage's ``stage.json`` metrics: its headline numbers (``headline_metrics``)."""
    from posttrain.evals.run import read_metrics

    return headline_metrics(read_metrics(run_dir))


def _rows_stats(path: Path) -> dict[str, Any]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        pass
    prompts = _prompts_done(path)
    with_rows = len({r.get("prompt_id") for r in rows if isinstance(r, dict)})
    stats: dict[str, Any] = {"prompts": prompts, "rows": len(rows),
                             "dropped_prompts": max(prompts - with_rows, 0)}
    counts = _meta(path).get("counts")
    if isinstance(counts, dict):
        stats.update({str(k): v for k, v in counts.items() if isinstance(v, int | float)})

    def mean(key: str, fn: Callable[[dict], Any]) -> None:  # over the rows fn applies to
        vals = [float(v) for r in rows if isinstance(r, dict)
                if isinstance(v := fn(r), int | float)]  # (a bool counts 1 or 0)
        if vals:
            stats[key] = sum(vals) / len(vals)

    mean("truncated_frac", lambda r: (r["finish_reason"] == "length")
         if "finish_reason" in r else None)
    mean("reward", lambda r: r.get("reward"))
    mean("judge_p", lambda r: r.get("judge_p"))
    mean("margin", lambda r: r["chosen_reward"] - r["rejected_reward"]
         if {"chosen_reward", "rejected_reward"} <= r.keys() else None)
    mean("revised_frac", lambda r: (r["revisions"][-1] != r.get("original"))
         if r.get("revisions") else None)
    return stats


def _numbers(obj: Any, prefix: str) -> dict[str, float]:
    """The numeric leaves of a JSON object, keyed by their path joined with ``/``."""
    if isinstance(obj, bool):
        return {}
    if isinstance(obj, int | float):
        return {prefix.rstrip("/"): obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items()
                for k, v in _numbers(val, f"{prefix}{key}/").items()}
    return {}


# --- the registry --------------------------------------------------------------------------

_OWN_KINDS = ("eval", "gate")  # commands (or stage kinds) with a kind of their own


def _data_kinds() -> dict[str, StageKind]:
    """Every command that neither trains nor evaluates: a data command."""
    return {name: data_kind(cmd) for name, cmd in COMMANDS.items()
            if name not in TRAIN_COMMANDS and name not in _OWN_KINDS}


def stage_kinds() -> dict[str, StageKind]:
    """Every kind by name: the training commands, ``eval``, the data commands, ``gate``,
    then registered kinds."""
    return {**_training_kinds(), "eval": _eval_kind(), **_data_kinds(), "gate": _gate_kind(),
            **_REGISTERED}


def canonical_kind(name: str) -> str:
    """A kind as the registry names it: two-word commands are kinds as on the command line
    (``cai revise``); ``cai_revise`` and ``cai-revise`` mean the same."""
    known = stage_kinds()
    if name in known:
        return name
    spaced = re.sub(r"[\s_-]+", " ", name.strip())
    return spaced if spaced in known else name


def get_kind(name: str) -> StageKind:
    known = stage_kinds()
    name = canonical_kind(name)
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown stage kind {name!r}{hint} (kinds: {', '.join(known)})")
    return known[name]
