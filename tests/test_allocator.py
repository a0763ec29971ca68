"""The CPU allocator tuning keeps freed pages in the process: once a training loop's
allocations have warmed the heap, the same large tensors are served without page faults,
where glibc's default maps them afresh (and faults them in again) every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, torch
from posttrain.train.allocator import keep_freed_memory
enabled = keep_freed_memory()
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(64 * 2**20 // 4), torch.ones(32 * 2**20 // 4)  # 64 and 32 MiB
    del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps([enabled, [faults_of_one_step() for _ in range(10)]]))
"""


def _probe(tuning: str) -> tuple[bool, list[int]]:
    env = {**os.environ, "POSTTRAIN_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout
    enabled, faults = json.loads(out)
    return enabled, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    enabled, faults = _probe("1")
    disabled, default_faults = _probe("0")
    assert enabled and not disabled
    pages = 96 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert min(default_faults[-3:]) > pages // 10  # every step maps and faults afresh
    assert sum(faults[-3:]) < pages // 50  # steady state: warm pages reused
