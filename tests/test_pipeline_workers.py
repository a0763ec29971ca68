"""A pipeline's worker processes: the threads asked for, and gone when the pipeline process
is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from posttrain.pipeline.workers import worker_pool

_PARENT = """
import os, sys, time
from posttrain.pipeline.workers import worker_pool
pool = worker_pool(2, threads=1)
pids = sorted({pool.submit(os.getpid).result() for _ in range(8)})
print(" ".join(map(str, pids)), flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


@pytest.mark.parametrize("threads", [1, 2])
def test_workers_run_the_threads_asked_for(threads):
    pool = worker_pool(2, threads=threads)
    try:
        assert pool.submit(_threads).result() == threads
    finally:
        pool.shutdown()


def _preload() -> str:
    return os.environ.get("LD_PRELOAD", "")


def test_workers_start_under_the_commands_allocator(monkeypatch):
    """A pipeline run from Python gets the allocator the posttrain command starts under; the
    parent's own environment is left as it was."""
    from posttrain.train.allocator import allocator_env

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    want = allocator_env().get("LD_PRELOAD")
    if want is None:
        pytest.skip("no tcmalloc/jemalloc installed here")
    pool = worker_pool(1)
    try:
        assert pool.submit(_preload).result() == want
    finally:
        pool.shutdown()
    assert "LD_PRELOAD" not in os.environ


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_killing_the_pipeline_takes_its_workers_down():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert pids and all(_alive(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
