"""The demo's branch workers: one thread each, and gone when the demo process is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from posttrain.demo import _branch_pool

_PARENT = """
import os, sys, time
from posttrain.demo import _branch_pool
pool = _branch_pool(2)
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


def test_workers_run_one_thread_each():
    pool = _branch_pool(2)
    assert pool is not None
    try:
        assert pool.submit(_threads).result() == 1
    finally:
        pool.shutdown()
    assert _branch_pool(1) is None  # --workers 1: everything in the calling process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_killing_the_demo_takes_its_workers_down():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert pids and all(_alive(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)
