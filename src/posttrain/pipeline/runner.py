"""Running a plan: which stages to skip, resume or redo, then the stages, in order or side by side.

A stage is skipped when its ``stage.json`` says done with the same fingerprint and its output
is there; resumed when it has the same fingerprint but did not finish (a crash, a SIGKILL) and
left something to continue (a training stage's last checkpoint, a data stage's finished
batches of rows); otherwise run from scratch in a fresh directory. A stage whose
fingerprint changed reruns from scratch, and so does everything downstream, since their
fingerprints contain its own. ``force`` reruns stages (and what is downstream) from scratch.

With ``workers > 1`` a stage that could run beside others (one on another branch) runs in a
worker process with ``cores // workers`` threads, the deepest ready stage first (the one
with the longest chain of stages after it); a stage every other stage depends on or
comes from runs here, with every core and the usual progress bar, and so does a stage the
file lists under ``alone:`` (the stages that could run beside it wait). Either way a given
stage always gets the same thread count, so a resumed stage computes what it computed before.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.pipeline.kinds import get_kind
from posttrain.pipeline.plan import Plan, Stage, load_plan
from posttrain.pipeline.record import is_done, read_stage, write_pipeline, write_stage
from posttrain.pipeline.source import PipelineError
from posttrain.pipeline.workers import quiet_transformers, worker_pool

log = logging.getLogger("posttrain")

SKIP, RESUME, FRESH = "skip", "resume", "fresh"


@dataclass(frozen=True)
class Step:
    stage: Stage
    action: str  # SKIP | RESUME | FRESH
    why: str  # for the log: "done", "interrupted at step 3", "config changed", ...


# --------------------------------------------------------------------------- what to run


def _stage_names(plan: Plan, name: str, option: str) -> list[str]:
    """A stage name; the bare name of a repeated stage means all its rounds."""
    rounds = [n for n in plan.names if n == name or n.partition("@")[0] == name]
    if not rounds:
        raise PipelineError([f"{option} {name}: no such stage (stages: "
                             f"{', '.join(plan.names)})"])
    return rounds


def _downstream(plan: Plan, names: Iterable[str]) -> set[str]:
    found = set(names)
    for s in plan.stages:  # run order: inputs come first
        if found.intersection(s.inputs):
            found.add(s.name)
    return found


def _resume_point(stage: Stage) -> str | None:
    """What an interrupted run of the stage would continue from (None: nothing)."""
    if "resume" not in stage.config:
        return None
    return get_kind(stage.kind).resume_point(stage.run_dir)


def decide(stage: Stage, forced: bool) -> Step:
    if forced:
        return Step(stage, FRESH, "forced")
    if is_done(stage):
        return Step(stage, SKIP, f"done, fingerprint {stage.fingerprint}")
    rec = read_stage(stage.run_dir)
    if rec is None:
        return Step(stage, FRESH, "new" if not stage.run_dir.exists() else "no stage.json")
    if rec.get("fingerprint") != stage.fingerprint:
        return Step(stage, FRESH, f"changed, fingerprint {rec.get('fingerprint')} -> "
                                  f"{stage.fingerprint}")
    point = _resume_point(stage)
    if point is None:
        return Step(stage, FRESH, f"{rec.get('status')}, nothing to resume from")
    return Step(stage, RESUME, f"{rec.get('status')}, resuming {point}")


def plan_steps(plan: Plan, until: str | None = None, only: str | None = None,
               force: Sequence[str] = ()) -> list[Step]:
    """What a run does with each selected stage, in run order."""
    if until is not None and only is not None:
        raise PipelineError(["--until and --only do not combine: pick one"])
    names = plan.names
    if until is not None:
        names = names[:names.index(_stage_names(plan, until, "--until")[-1]) + 1]
    if only is not None:
        names = _stage_names(plan, only, "--only")[-1:]
    forced = _downstream(plan, [n for f in force for n in _stage_names(plan, f, "--force")])
    steps = [decide(plan[n], n in forced) for n in names]
    if only is not None:
        _require_done(plan, steps[0].stage)
    return steps


def _require_done(plan: Plan, stage: Stage) -> None:
    missing = [n for n in stage.inputs if not is_done(plan[n])]
    if missing:
        raise PipelineError([f"--only {stage.name}: its input(s) {', '.join(missing)} are not "
                             "done with their current config; run them first (or drop --only)"])


# --------------------------------------------------------------------------- running


def run_stage(kind_name: str, config: dict[str, Any]) -> str:
    """Build the stage's config with its command's config class and run it."""
    from posttrain.config import config_from_dict

    kind = get_kind(kind_name)
    return str(kind.run(config_from_dict(kind.config_cls(), config)))


def _worker_stage(name: str, kind_name: str, config: dict[str, Any], threads: int) -> str:
    import torch

    multiprocessing.current_process().name = name  # tags this stage's log lines
    torch.set_num_threads(threads)
    return run_stage(kind_name, config)


def _named(stage: Stage, err: BaseException) -> BaseException:
    """A user-facing error says which stage it came from; anything else keeps its traceback."""
    if isinstance(err, PosttrainError):
        return PosttrainError(f"stage {stage.name!r} ({stage.kind}): {err}")
    return err


def _widths(plan: Plan) -> dict[str, int]:
    """For each stage, 1 + the number of stages it could run beside (neither up- nor
    downstream of it): fixed by the file, so a stage's thread count never varies."""
    down = {s.name: _downstream(plan, [s.name]) for s in plan.stages}
    return {a: sum(1 for b in plan.names if a not in down[b] and b not in down[a]) + 1
            for a in plan.names}


def _depths(plan: Plan) -> dict[str, int]:
    """For each stage, the most stages on a chain from it to the end of the plan (itself
    included): when several could start, the deepest starts first, so the longest branch is
    not left to run alone at the end."""
    depth: dict[str, int] = {}
    for s in reversed(plan.stages):  # run order reversed: dependants come first
        depth[s.name] = 1 + depth.get(s.name, 0)
        for name in s.inputs:  # the deepest chain through a dependant, so far
            depth[name] = max(depth.get(name, 0), depth[s.name])
    return depth


class _Runner:
    def __init__(self, plan: Plan, workers: int) -> None:
        self.plan = plan
        self.workers = workers
        self.width = _widths(plan)
        self.depth = _depths(plan)
        self.cores = os.cpu_count() or 1
        self.started: dict[str, float] = {}

    def threads(self, stage: Stage) -> int:
        return max(1, self.cores // min(self.workers, self.width[stage.name]))

    def inline(self, stage: Stage) -> bool:
        return self.workers == 1 or self.width[stage.name] == 1 or stage.name in self.plan.alone

    def begin(self, step: Step) -> dict[str, Any]:
        """Prepare the stage's directory and record; returns the config to run it with."""
        stage = step.stage
        if step.action == FRESH:
            shutil.rmtree(stage.run_dir, ignore_errors=True)
        stage.run_dir.mkdir(parents=True, exist_ok=True)
        write_stage(self.plan, stage, "running")
        log.info("stage %s (%s): start, %s", stage.name, stage.kind, step.why)
        self.started[stage.name] = time.perf_counter()
        config = dict(stage.config)
        if "resume" in config:
            config["resume"] = step.action == RESUME
        if "overwrite" in config:  # killed after writing final/ but before stage.json said so
            continues = get_kind(stage.kind).continues_output  # (a data stage appends instead)
            config["overwrite"] = step.action == RESUME and not continues
        return config

    def finish(self, stage: Stage, produced: str | None, err: BaseException | None) -> None:
        seconds = time.perf_counter() - self.started[stage.name]
        if err is not None:
            write_stage(self.plan, stage, "failed", seconds, error=str(err) or repr(err))
            log.error("stage %s (%s): failed after %.1f s", stage.name, stage.kind, seconds)
            return
        if produced is not None and Path(produced) != stage.output:
            log.warning("stage %s wrote its output to %s, not %s", stage.name, produced,
                        stage.output)
        metrics = get_kind(stage.kind).summary(stage.run_dir)
        write_stage(self.plan, stage, "done", seconds, metrics)
        log.info("stage %s (%s): done in %.1f s", stage.name, stage.kind, seconds)

    def run_here(self, step: Step) -> None:
        config = self.begin(step)
        try:
            produced = run_stage(step.stage.kind, config)
        except BaseException as err:
            self.finish(step.stage, None, err)
            named = _named(step.stage, err)
            if named is err:
                raise
            raise named from err
        self.finish(step.stage, produced, None)

    def pool(self, steps: list[Step]) -> ProcessPoolExecutor | None:
        side = [s.stage for s in steps if not self.inline(s.stage)]
        if not side:
            return None
        modules = sorted({get_kind(s.kind).config_cls().__module__ for s in side})
        n = min(self.workers, len(side))
        return worker_pool(n, threads=max(1, self.cores // n), preload=modules)

    def run(self, steps: list[Step]) -> None:
        self.pending = [s for s in steps if s.action != SKIP]
        self.waiting = {s.stage.name for s in self.pending}  # unfinished: dependants wait
        self.running: dict[Future[str], Stage] = {}
        self.failure: BaseException | None = None
        pool = self.pool(self.pending)
        try:
            while self.pending or self.running:
                if not self.run_next_here():
                    assert pool is not None  # built for every stage that runs beside others
                    self.submit_ready(pool)
                    self.collect()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if self.failure is not None:
            raise self.failure

    def ready(self) -> list[Step]:
        """Stages whose inputs are done, in plan order; side by side, deepest first."""
        ready = [s for s in self.pending if not self.waiting.intersection(s.stage.inputs)]
        if self.workers == 1:
            return ready
        return sorted(ready, key=lambda s: -self.depth[s.stage.name])

    def run_next_here(self) -> bool:
        """Run a ready stage that runs in this process, if nothing runs beside it."""
        here = next((s for s in self.ready() if self.inline(s.stage)), None)
        if here is None or self.running:
            return False
        self.pending.remove(here)
        self.run_here(here)
        self.waiting.discard(here.stage.name)
        return True

    def submit_ready(self, pool: ProcessPoolExecutor) -> None:
        for step in self.ready():
            if len(self.running) < self.workers and not self.inline(step.stage):
                self.pending.remove(step)
                config = self.begin(step)
                fut = pool.submit(_worker_stage, step.stage.name, step.stage.kind, config,
                                  self.threads(step.stage))
                self.running[fut] = step.stage

    def collect(self) -> None:
        """Wait for a worker's stage to end and record it; after a failure, start no more."""
        done, _ = wait(self.running, return_when=FIRST_COMPLETED)
        for fut in done:
            stage = self.running.pop(fut)
            err = fut.exception()
            self.finish(stage, None if err else fut.result(), err)
            self.waiting.discard(stage.name)
            if err is not None:
                self.failure = self.failure or _named(stage, err)
                self.pending = []  # the stages running beside it still finish


def _announce(plan: Plan, steps: list[Step]) -> None:
    counts = {a: sum(s.action == a for s in steps) for a in (SKIP, RESUME, FRESH)}
    log.info("pipeline %s: %d stages in %s (%d done, %d to resume, %d to run)", plan.file,
             len(steps), plan.output_dir, counts[SKIP], counts[RESUME], counts[FRESH])
    for s in steps:
        if s.action == SKIP:
            log.info("stage %s (%s): skipped, %s", s.stage.name, s.stage.kind, s.why)


def check_pipeline(source: Any, overrides: Sequence[str] = (),
                   output_dir: str | os.PathLike[str] | None = None,
                   workers: int | None = None) -> Plan:
    """Validate a pipeline file and plan it; raises PipelineError, creates nothing."""
    return load_plan(source, list(overrides), output_dir=output_dir, workers=workers)


def run_pipeline(source: Any, *, until: str | None = None, only: str | None = None,
                 force: Sequence[str] = (), output_dir: str | os.PathLike[str] | None = None,
                 workers: int | None = None, overrides: Sequence[str] = ()) -> dict[str, Path]:
    """Run a pipeline file (or mapping); returns ``{stage: model directory}`` of the stages
    it selected. The whole file is checked first: on any problem nothing runs.

    ``until``: stop after that stage; ``only``: run just that stage (its inputs must be
    done); ``force``: rerun these stages and everything downstream from scratch.
    """
    plan = check_pipeline(source, overrides, output_dir, workers)
    steps = plan_steps(plan, until, only, force)
    write_pipeline(plan)
    quiet_transformers()
    _announce(plan, steps)
    t0 = time.perf_counter()
    _Runner(plan, plan.workers).run(steps)
    log.info("pipeline %s: finished in %.1f s", plan.file, time.perf_counter() - t0)
    from posttrain.report import build_report

    log.info("report: %s", build_report(plan.output_dir))
    return {s.stage.name: s.stage.output for s in steps}

