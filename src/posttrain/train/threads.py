"""CPU threads that follow the cores other processes leave free.

torch runs its CPU ops on an OpenMP team of ``torch.get_num_threads()`` threads, and every
parallel op ends when its slowest thread does. When another process keeps a core busy, one of
our threads is preempted for whole scheduler slices and every op waits for it (libgomp's idle
threads also spin, taking CPU from the very process that preempted them): on 2 cores with one
busy competitor a run measured 1.9-3.1x slower than alone, where its fair share is 2x.
With one thread fewer it runs at the speed of the cores it actually gets (benchmarks/README.md).

``ThreadGovernor`` measures, between training steps, how many of the cores this process may
use (its CPU affinity) were busy with *other* processes since the last look (``/proc/stat``
busy time minus this process's own CPU time), and sets the thread count to the free cores,
rounded, between 1 and the count the process started with (``OMP_NUM_THREADS``, a pipeline
worker's share). It re-evaluates every ``interval_s`` seconds, so a competitor that finishes
gives the threads back. ``torch.set_num_threads`` applies to the calling thread's later ops,
so ``tick`` is called from the training loop (``Engine.update``).

``POSTTRAIN_THREADS=N`` fixes the count at N and turns the governor off; so does
``POSTTRAIN_THREADS=fixed`` (keep the start count). Linux only (elsewhere a no-op).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("posttrain")

ENV = "POSTTRAIN_THREADS"


@dataclass(frozen=True)
class CpuSample:
    """A moment's counters: wall seconds, busy core-seconds of the allowed cores (all
    processes), and this process's CPU seconds."""

    wall: float
    busy: float
    own: float


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def read_sample(cpus: set[int]) -> CpuSample | None:
    """Busy time of ``cpus`` from ``/proc/stat`` (user, nice, system, irq, softirq, steal:
    time the core did not give to idle or to waiting on I/O); None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            f = [int(x) for x in rest.split()]
            busy += f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    t = os.times()
    return CpuSample(time.monotonic(), busy / tick, t.user + t.system)


def free_cores(before: CpuSample, after: CpuSample, cores: int) -> float:
    """Cores not used by other processes between two samples."""
    wall = after.wall - before.wall
    if wall <= 0:
        return float(cores)
    others = (after.busy - before.busy) - (after.own - before.own)
    return cores - max(others, 0.0) / wall


class ThreadGovernor:
    """Sets torch's thread count to the cores other processes leave free (module doc)."""

    def __init__(self, cap: int, cpus: set[int], interval_s: float = 2.0,
                 sample: Callable[[set[int]], CpuSample | None] = read_sample,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cap, self.cpus, self.interval_s = cap, cpus, interval_s
        self._sample, self._set, self._clock = sample, set_threads, clock
        self.threads = cap
        self._last = sample(cpus)

    def tick(self, current: int | None = None) -> int:
        """Re-evaluate when ``interval_s`` has passed; returns the thread count in use.
        ``current``: the count torch has now; one that differs from what the governor set was
        set by someone else (a pipeline worker starting a stage) and becomes the new cap."""
        if current is not None and current != self.threads:
            self.cap = self.threads = current
        if self._last is None or self._clock() - self._last.wall < self.interval_s:
            return self.threads  # called every step: /proc/stat is read once per interval
        now = self._sample(self.cpus)
        if now is None:
            return self.threads
        free = free_cores(self._last, now, len(self.cpus))
        self._last = now
        want = max(1, min(self.cap, int(free + 0.5)))
        if want != self.threads:
            log.debug("threads: %d -> %d (%.1f cores free)", self.threads, want, free)
            self._set(want)
            self.threads = want
        return self.threads


_governor: ThreadGovernor | None = None
_off = False


def _make_governor() -> ThreadGovernor | None:
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting not in ("", "auto"):
        if setting.isdigit() and int(setting) >= 1:
            torch.set_num_threads(int(setting))
        return None
    cap = torch.get_num_threads()
    if cap <= 1 or not os.path.exists("/proc/stat"):
        return None
    return ThreadGovernor(cap, _allowed_cpus())


def govern_threads() -> int:
    """Called between steps: adapts the thread count of this process (module doc)."""
    global _governor, _off
    if _off:
        return torch.get_num_threads()
    if _governor is None:
        _governor = _make_governor()
        if _governor is None:
            _off = True
            return torch.get_num_threads()
    return _governor.tick(torch.get_num_threads())
