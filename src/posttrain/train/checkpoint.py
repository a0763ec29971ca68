"""Atomic checkpoints: written to a temporary directory, then renamed into place.

Layout (DESIGN.md §4)::

    checkpoints/step-N/model/           HF format (safetensors, tokenizer, chat template)
    checkpoints/step-N/trainer_state/   optimizer, scheduler, RNG, data cursor, step

A kill at any moment leaves either the previous checkpoint or the new one, never half of one:
``os.replace`` of a directory is atomic on POSIX filesystems.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.errors import TrainingError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first; temporary leftovers are ignored."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def assert_finite(model: nn.Module) -> None:
    """Refuse to save non-finite weights: a checkpoint must always be a usable model."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise TrainingError(f"refusing to save: parameter '{name}' has NaN/inf values")


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    save_model_fn: Any,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the ``keep_last`` newest (0 = keep all).

    ``save_model_fn(path)`` writes the HF model directory; ``trainer_state`` is a dict of
    tensors/containers saved with ``torch.save`` and loaded back with ``weights_only=True``.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_fn(tmp / "model")
    (tmp / "trainer_state").mkdir(parents=True)
    torch.save(trainer_state, tmp / "trainer_state" / "state.pt")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(run_dir, keep_last)
    return final


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "trainer_state" / "state.pt", weights_only=True)


def _prune(run_dir: Path, keep_last: int) -> None:
    found = list_checkpoints(run_dir)
    if keep_last > 0:
        for _, path in found[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    for leftover in checkpoints_dir(run_dir).glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
