"""A rich progress bar with ETA and the running loss; plain log lines when not on a terminal."""

from __future__ import annotations

import logging
import os
import sys
import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

log = logging.getLogger("posttrain")


class Progress:
    def __init__(self, total: int, description: str = "train", enabled: bool | None = None):
        self.total = total
        if enabled is None:  # POSTTRAIN_PROGRESS=plain: log lines even on a terminal
            enabled = sys.stderr.isatty() and os.environ.get("POSTTRAIN_PROGRESS") != "plain"
        self.interactive = enabled
        self._last_line = 0.0
        self._bar: RichProgress | None = None
        if self.interactive:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total, loss="-")
            self._bar.start()

    def advance(self, step: int, loss: float | None) -> None:
        shown = "-" if loss is None else f"{loss:.4f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=shown)
        elif time.monotonic() - self._last_line > 10 or step == self.total:
            self._last_line = time.monotonic()
            log.info("step %d/%d loss %s", step, self.total, shown)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
