"""Worker processes for stages that run side by side: a few threads each, gone with the parent.

Spawned, not forked: the parent holds torch's thread pools and a rich live display, neither of
which survives a fork. Each worker logs plain progress lines tagged with its process name.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def quiet_transformers() -> None:
    """Stages load and save many small models: drop transformers' per-load progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _worker_init(level: int, threads: int, preload: Sequence[str]) -> None:
    import torch

    os.environ["POSTTRAIN_PROGRESS"] = "plain"
    if sys.platform.startswith("linux"):  # a killed parent must not leave its workers behind
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    torch.set_num_threads(threads)
    quiet_transformers()
    logging.basicConfig(level=level, format="[%(processName)s] %(message)s", force=True)
    for module in preload:  # imports done while the parent is still busy
        importlib.import_module(module)


def worker_pool(n: int, threads: int = 1, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """``n`` spawned workers of ``threads`` torch threads each, started now.

    ``preload`` names modules each worker imports at start (the recipes it will run), so
    that their import overlaps the parent's work instead of delaying the first task.
    """
    level = logging.getLogger("posttrain").getEffectiveLevel()
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(level, threads, tuple(preload)))
    with _children_allocator():
        for _ in range(n):  # the pool starts processes on demand: ask for all of them now
            pool.submit(int)
    return pool


@contextlib.contextmanager
def _children_allocator() -> Iterator[None]:
    """Processes started inside get the allocator the ``posttrain`` command starts under
    (``train/allocator.py``): a pipeline run from Python trains as fast as from the CLI.
    A spawned child reads ``os.environ`` as it starts, so it is set only meanwhile."""
    from posttrain.train.allocator import allocator_env

    try:
        extra = allocator_env()
    except ValueError:  # a POSTTRAIN_ALLOCATOR that is not installed: the CLI warns about it
        extra = {}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
