"""Run set-up shared by recipes: the run directory, resume, loading the policy, and stopping
on SIGINT/SIGTERM with a checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.report.instruments import INSTRUMENTS
from posttrain.train import checkpoint as ckpt
from posttrain.train import distributed as ddp
from posttrain.train.config import TrainConfig
from posttrain.train.engine import Engine, seed_everything

log = logging.getLogger("posttrain")


def prepare_run(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """Create ``output_dir`` and seed; return (run_dir, checkpoint to resume from or None).

    Joins the torchrun process group when launched with several processes (under fsdp2 a
    one-rank group otherwise), with ``dist_timeout``. The resolved config is written by the
    ``Engine``, once the recipe has made its run-time choices.
    """
    info = ddp.init_distributed(cfg.dist_timeout, need_group=cfg.strategy == "fsdp2")
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log.warning("resume=true but %s has no checkpoint; starting from scratch", run_dir)
    ddp.barrier(info)  # every rank has checked the directory before rank 0 writes to it
    if info.is_main:
        if resume_from is None:
            clear_run(run_dir)  # a fresh start: nothing of an earlier run may mix with it
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            step = ckpt.load_trainer_state(resume_from)["step"]
            for log_file in ("metrics.jsonl", INSTRUMENTS):
                truncate_after_step(run_dir / log_file, step)
    seed_everything(cfg.seed)
    ddp.barrier(info)
    return run_dir, resume_from


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, a run that would replace a finished run's ``final/`` or mix
    with an unfinished run's checkpoints; ``overwrite=true`` allows both."""
    ckpt.check_output_dir(run_dir)
    if overwrite:
        return
    if (run_dir / "final").exists():
        raise PosttrainError(
            f"{run_dir} is a finished run (final/ exists); use a new output_dir, "
            "or overwrite=true to replace it"
        )
    if not resume and ckpt.list_checkpoints(run_dir):
        raise PosttrainError(
            f"output_dir '{run_dir}' already holds a run; pass resume=true to continue it, "
            "overwrite=true to replace it, or choose another output_dir"
        )


# What a run writes into its directory; a fresh start removes them and nothing else, since
# output_dir may be a directory that also holds the user's own files.
RUN_FILES = (
    "final", ".tmp-final", "checkpoints", "metrics.jsonl", INSTRUMENTS, "tensorboard",
)


def clear_run(run_dir: Path) -> None:
    """Remove an earlier run's model, checkpoints and step logs from ``run_dir``."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():  # a link is removed, not what it points to
            path.unlink()


def truncate_after_step(path: Path, step: int) -> None:
    """Drop the rows of a step-indexed JSONL log written after the checkpoint we resume from:
    they will be written again."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(f"{ln}\n" for ln in keep))


# ---- stopping on a signal ------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal; ``signum`` gives the exit status (128 + signum)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message, signum)
        self.signum = signum

    def __str__(self) -> str:
        return str(self.args[0])


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, a scheduler's preemption) during training:
    finish the current step, save a checkpoint, say so, and raise :class:`Interrupted`.

        with StopOnSignal() as stop:
            while engine.step < engine.total_steps:
                ...one step...
                stop.after_step(engine, lambda: engine.save(cursor))

    Dying mid-step would lose every step since the last checkpoint, and saving mid-step would
    save half an update, so the handlers only note the signal and the loop acts on it at the
    step boundary. A second signal stops at once (the last checkpoint stays intact).
    Handlers are installed only in the main thread; the previous ones come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            raise Interrupted(f"{name} again: stopped at once; the last checkpoint is intact",
                              signum)
        self.received = signum
        log.warning("%s received: stopping after this step with a checkpoint (send it again "
                    "to stop at once)", name)

    def after_step(self, engine: Engine, save: Callable[[], Path]) -> None:
        """At a step boundary: when a signal came (on any rank), checkpoint and raise."""
        if not _on_any_rank(self.received is not None, engine):
            return
        path = ckpt.checkpoints_dir(engine.run_dir) / f"step-{engine.step}"
        # save_steps may have saved this very step; rank 0 (the writer) decides for all ranks.
        if not _on_any_rank(engine.dist.is_main and path.is_dir(), engine):
            path = save()
        signum = self.received or signal.SIGTERM  # a rank that got none follows the others
        name = signal.Signals(signum).name
        raise Interrupted(f"interrupted by {name} at step {engine.step} of "
                          f"{engine.total_steps}: saved checkpoint {path}; run the same "
                          "command with resume=true to continue", signum)


def _on_any_rank(flag: bool, engine: Engine) -> bool:
    return ddp.all_reduce_sum(float(flag), engine.dist, engine.device) > 0
