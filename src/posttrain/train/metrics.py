"""Metric sinks: ``metrics.jsonl`` always; TensorBoard and W&B on request."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("posttrain")


def _scalar(v: Any) -> float | int | None:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return None


class MetricsLogger:
    """Writes one JSON object per logged step; mirrors scalars to the requested sinks."""

    def __init__(self, run_dir: Path, report_to: list[str], config: dict[str, Any] | None = None,
                 enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        run_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered: a crash loses nothing. Closed in close(), so no context manager.
        self._file = open(self.path if enabled else os.devnull, "a", buffering=1)  # noqa: SIM115
        self._tb = None
        self._wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in report_to:
            self._wandb = _init_wandb(run_dir, config)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float | int | None]:
        row: dict[str, float | int | None] = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k not in ("step", "time") and v is not None}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        return row

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _init_wandb(run_dir: Path, config: dict[str, Any] | None) -> Any:
    try:
        import wandb
    except ImportError:
        log.warning("report_to includes wandb but the wandb package is not installed; skipping")
        return None
    # Offline unless the user configured otherwise, so runs never block on the network.
    os.environ.setdefault("WANDB_MODE", "offline")
    return wandb.init(dir=str(run_dir), config=config or {}, name=run_dir.name)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
