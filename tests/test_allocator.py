"""The CPU allocator tuning (``posttrain.train.allocator``): large blocks come from the heap,
not from fresh mmaps, and freed ones stay in the process (the heap is never trimmed), so a
training loop's next step can reuse them. Observed directly: a 64 MiB tensor's storage lies
inside the ``[heap]`` mapping only when tuned, and the program break does not move back when
it is freed. (An earlier version asserted that the break grew by the full 64 MiB, which failed
by a few KiB whenever the heap's top already had free slack.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, torch
from posttrain.train.allocator import keep_freed_memory
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]
enabled = keep_freed_memory()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest mmap threshold
heap = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
heap_start, heap_end = (int(a, 16) for a in heap.split()[0].split("-"))
ptr = x.data_ptr()
in_heap = heap_start <= ptr and ptr + x.nbytes <= heap_end
brk = libc.sbrk(0)
del x
kept = libc.sbrk(0) == brk
print(json.dumps([enabled, in_heap, kept]))
"""


def _probe(tuning: str) -> tuple[bool, bool, bool]:
    env = {**os.environ, "POSTTRAIN_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout
    enabled, in_heap, kept = json.loads(out)
    return enabled, in_heap, kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_large_blocks_come_from_the_heap_and_stay_after_free():
    enabled, in_heap, kept = _probe("1")
    assert enabled
    assert in_heap  # served from the heap, not a fresh mmap
    assert kept  # the heap is not trimmed when the block is freed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_glibc_defaults_when_disabled():
    enabled, in_heap, _ = _probe("0")
    assert not enabled
    assert not in_heap  # glibc's default: a separate mmap, outside the heap
