"""Atomic checkpoints: written to a temporary directory, then renamed into place.

Layout (DESIGN.md §4)::

    checkpoints/step-N/model/           HF format (safetensors, tokenizer, chat template)
    checkpoints/step-N/trainer_state/   optimizer, scheduler, RNG, data cursor, step

A sharded run (``strategy=fsdp2``) writes ``sharded/`` instead of ``model/``: a
torch.distributed.checkpoint directory of every trained model's weights and optimizer state,
one file per rank, re-sharded on load to any world size; ``trainer_state/`` then holds the
rest (scheduler, RNG, data cursor, step). All ranks write into the same temporary directory,
so a multi-node run needs ``output_dir`` on a shared filesystem.

A kill at any moment leaves either the previous checkpoint or the new one, never half of one:
``os.replace`` of a directory is atomic on POSIX filesystems. A write that fails (a full disk)
removes its temporary directory and raises a one-line error naming what is still intact; a
temporary left by a killed process (``.tmp-...-PID`` with PID gone) is removed at the next
start (``clean_stale_temporaries``). Resume skips a damaged newest checkpoint for the newest
intact one (``latest_checkpoint``).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.errors import PosttrainError, TrainingError
from posttrain.train.distributed import DistInfo, barrier, broadcast_object

log = logging.getLogger("posttrain")

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Temporaries of checkpoints and of final/: .tmp-step-N-PID, .tmp-final-PID (.tmp-final: older).
_TMP_PID = re.compile(r"^\.tmp-(?:step-\d+|final)(?:-(\d+))?$")
STATE_FILE = Path("trainer_state") / "state.pt"
SHARDED_DIR = "sharded"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints as (step, path), oldest first, damaged ones included; temporary leftovers
    are ignored."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint. A damaged newer one (unreadable trainer state, missing
    weights) is skipped with a warning, so a run resumes from the step before it rather than
    not at all; it is replaced when training reaches its step again. When every checkpoint
    is damaged, the newest: loading it gives the error (``load_trainer_state``), and nothing
    is deleted by starting afresh in its place."""
    found = list_checkpoints(run_dir)
    for i, (_, path) in enumerate(reversed(found)):
        if checkpoint_problem(path) is None:
            for _, bad in found[len(found) - i:]:
                log.warning("checkpoint %s is damaged (%s); resuming from %s instead",
                            bad.name, checkpoint_problem(bad), path.name)
            return path
    return found[-1][1] if found else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None. Reads the trainer state memory-mapped
    (cheap: tensors are not copied) and checks that model weights are there."""
    state = ckpt / STATE_FILE
    if not state.is_file():
        return f"{STATE_FILE} is missing"
    try:
        loaded = torch.load(state, weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        return f"{state} cannot be read: {_first_line(e)}"
    if not isinstance(loaded, dict) or "step" not in loaded:
        return f"{state} holds no trainer state"
    if is_sharded(ckpt):
        return None
    if not any((ckpt / "model").rglob("*.safetensors")):
        return f"{ckpt / 'model'} has no weights (*.safetensors)"
    return None


def is_sharded(ckpt: Path) -> bool:
    """Whether ``ckpt`` was written by a sharded run (its DCP metadata is there)."""
    return (ckpt / SHARDED_DIR / ".metadata").is_file()


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of ``ckpt``; a damaged file is a one-line error naming it and the
    checkpoint to fall back to."""
    path = ckpt / STATE_FILE
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or overwritten file: any of torch's load errors
        earlier = [p for step, p in list_checkpoints(ckpt.parent.parent)
                   if step < _step(ckpt) and checkpoint_problem(p) is None]
        hint = (f"the previous checkpoint {earlier[-1].name} is intact: delete {ckpt} and "
                "resume again" if earlier else "no earlier checkpoint is intact: drop "
                "resume=true and pass overwrite=true to start over")
        raise TrainingError(f"{path} is damaged ({_first_line(e)}); {hint}") from e


def _step(ckpt: Path) -> int:
    m = _STEP_DIR.match(ckpt.name)
    return int(m.group(1)) if m else -1


def _first_line(e: BaseException) -> str:
    """The first sentence of ``e``'s message (torch appends a paragraph of advice)."""
    lines = str(e).strip().splitlines()
    return lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__


# ---- where a run writes ---------------------------------------------------------------------


def check_output_dir(run_dir: Path) -> None:
    """Refuse an ``output_dir`` that is a file or sits where nothing can be written, before any
    work (model loading, training) is spent on a run that could not save."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == run_dir else f"is inside '{existing}', a file"
        raise PosttrainError(f"output_dir '{run_dir}' {where}, not a directory; choose "
                             "another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == run_dir else f" ('{existing}' is not writable)"
        raise PosttrainError(f"output_dir '{run_dir}' is not writable{where}; choose another "
                             "output_dir or fix its permissions")


def warn_if_no_room(run_dir: Path, need: int, what: str) -> None:
    """Warn, before the first save, when ``what`` (about ``need`` bytes) will not fit on the
    filesystem of ``run_dir``; better now than after hours of training."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need:
        log.warning("%s needs about %s but only %s is free on the filesystem of %s: saving "
                    "will fail with no space left unless space is freed", what,
                    format_bytes(need), format_bytes(free), run_dir)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def clean_stale_temporaries(run_dir: Path) -> None:
    """Remove temporaries of saves whose process is gone (killed mid-save, or this process
    before it started again): they may hold gigabytes, e.g. what filled the disk."""
    for root in (checkpoints_dir(run_dir), run_dir):
        if not root.is_dir():
            continue
        for path in root.iterdir():
            m = _TMP_PID.match(path.name)
            if m and not _writer_alive(int(m.group(1)) if m.group(1) else None):
                log.info("removing %s, left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)


def _writer_alive(pid: int | None) -> bool:
    """Whether process ``pid`` (another than this one) is running. A pid reused by an unrelated
    process reads as alive: that temporary goes at the next successful checkpoint."""
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def removed_on_failure(tmp: Path, what: str, intact: Callable[[], str]) -> Iterator[None]:
    """Write into ``tmp`` inside the block; if the write fails, remove ``tmp`` (a full disk
    stays full otherwise) and turn an I/O failure into one line: what could not be written,
    why, and ``intact()`` (what survives). Other exceptions propagate unchanged."""
    try:
        yield
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(e)
        if reason is None:
            raise
        raise TrainingError(f"{reason} writing {what} ({intact()})") from e


_OS_ERROR = re.compile(r"os error (\d+)")
_WRITE_FAILED = ("unexpected pos", "file write failed")
_REASONS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}


def write_failure(exc: BaseException) -> str | None:
    """A short reason when ``exc`` (or what caused it) is a failed write, else None.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos ...`` with the OSError as its context; safetensors as ``SafetensorError``
    with ``os error 28`` in its text; the rest as OSError."""
    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "errno", None)
        if not isinstance(code, int) and (m := _OS_ERROR.search(str(seen))):
            code = int(m.group(1))
        if isinstance(code, int):
            return _REASONS.get(code) or os.strerror(code).lower()
        seen = seen.__cause__ or seen.__context__
    if any(s in str(exc) for s in _WRITE_FAILED):
        return "write failed"
    return None


# ---- saving -------------------------------------------------------------------------------


def assert_finite(model: nn.Module) -> None:
    """Refuse to save non-finite weights: a checkpoint must always be a usable model."""
    name = nonfinite_parameter(model)
    if name is not None:
        raise TrainingError(f"refusing to save: parameter '{name}' has NaN/inf values")


def nonfinite_parameter(model: nn.Module) -> str | None:
    """The first parameter with a NaN/inf value, or None; of a sharded parameter only this
    rank's shard is read."""
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not torch.isfinite(local).all():
            return name
    return None


def rng_state() -> dict[str, Any]:
    """This process's RNG streams (torch CPU, its current CUDA device's, Python's)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
    A failed write removes the temporary directory and raises TrainingError (see
    ``removed_on_failure``).
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_on_failure(tmp, f"checkpoint step-{step} in {root}",
                            lambda: _intact_note(run_dir, step)):
        save_model_fn(tmp / "model")
        (tmp / "trainer_state").mkdir(parents=True)
        # A file object, not a path: torch then keeps the OSError (e.g. ENOSPC) as the
        # context of its own error, which is how write_failure recognises a full disk.
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(trainer_state, f)
        fsync_tree(tmp)
    _commit(run_dir, tmp, final, keep_last)
    return final


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    save_shards_fn: Callable[[Path], None],
    trainer_state: dict[str, Any],
    keep_last: int,
    info: DistInfo,
) -> Path:
    """``save_checkpoint`` for a sharded run: every rank calls it. ``save_shards_fn(path)``
    (collective) writes the DCP directory ``sharded/``; rank 0 writes ``trainer_state``,
    then renames the temporary directory into place and prunes."""
    root = checkpoints_dir(run_dir)
    final = root / f"step-{step}"
    # One temporary for all ranks, named after the writer (rank 0) like an unsharded one.
    tmp = Path(str(broadcast_object(str(root / f".tmp-step-{step}-{os.getpid()}"), info)))
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(info)
    with removed_on_failure(tmp, f"checkpoint step-{step} in {root}",
                            lambda: _intact_note(run_dir, step)):
        save_shards_fn(tmp / SHARDED_DIR)  # DCP raises on every rank if any rank failed
        if info.is_main:
            (tmp / "trainer_state").mkdir(parents=True)
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(trainer_state, f)
            fsync_tree(tmp)
    if info.is_main:
        _commit(run_dir, tmp, final, keep_last)
    barrier(info)
    return final


def _commit(run_dir: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Rename a complete temporary checkpoint into place, then prune."""
    if final.exists():  # a damaged checkpoint of this step, skipped on resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _prune(run_dir, keep_last)


def _intact_note(run_dir: Path, step: int) -> str:
    found = list_checkpoints(run_dir)
    if found:
        return (f"{found[-1][1].name} is intact; free space, then resume=true continues "
                "from it")
    return f"no earlier checkpoint: the {step} steps trained are lost; free space and rerun"


def _prune(run_dir: Path, keep_last: int) -> None:
    found = list_checkpoints(run_dir)
    if keep_last > 0:
        for _, path in found[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    # This process just saved: it is the run's writer, so any other temporary is a leftover.
    for leftover in checkpoints_dir(run_dir).glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk before it is renamed into place (a full disk
    with delayed allocation may only report ENOSPC here)."""
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
