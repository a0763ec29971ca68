"""The thread governor: thread count = cores other processes leave free, within the cap."""

from __future__ import annotations

import sys

import pytest
import torch

from posttrain.train import threads
from posttrain.train.threads import CpuSample, ThreadGovernor, free_cores


class FakeCpu:
    """Counters advanced by hand: each ``run`` is ``wall`` seconds in which this process used
    ``own`` core-seconds and others ``others``."""

    def __init__(self) -> None:
        self.now = CpuSample(wall=100.0, busy=0.0, own=0.0)

    def run(self, wall: float, own: float, others: float) -> None:
        n = self.now
        self.now = CpuSample(n.wall + wall, n.busy + own + others, n.own + own)

    def sample(self, cpus: set[int]) -> CpuSample:
        return self.now


def governor(cpu: FakeCpu, cap: int = 2) -> tuple[ThreadGovernor, list[int]]:
    calls: list[int] = []
    return ThreadGovernor(cap, {0, 1}, interval_s=2.0, sample=cpu.sample,
                          set_threads=calls.append, clock=lambda: cpu.now.wall), calls


def test_free_cores_subtracts_only_other_processes() -> None:
    a = CpuSample(0.0, 10.0, 3.0)
    b = CpuSample(4.0, 16.0, 7.0)  # 6 core-s busy in 4 s, 4 of them ours
    assert free_cores(a, b, 2) == pytest.approx(1.5)
    assert free_cores(a, CpuSample(4.0, 14.0, 7.5), 2) == 2.0  # own time counted late: 0 others


def test_a_busy_competitor_takes_a_thread_and_gives_it_back() -> None:
    cpu = FakeCpu()
    gov, calls = governor(cpu)
    cpu.run(wall=3.0, own=3.0, others=3.0)  # a spin loop holds one of the two cores
    assert gov.tick(2) == 1 and calls == [1]
    cpu.run(wall=1.0, own=1.0, others=0.0)  # within the interval: no new decision
    assert gov.tick(1) == 1 and calls == [1]
    cpu.run(wall=3.0, own=3.0, others=0.2)  # the competitor ended
    assert gov.tick(1) == 2 and calls == [1, 2]


def test_never_below_one_thread_nor_above_the_cap() -> None:
    cpu = FakeCpu()
    gov, _ = governor(cpu)
    cpu.run(wall=2.0, own=0.5, others=8.0)  # a machine far busier than its cores
    assert gov.tick(2) == 1
    cpu.run(wall=2.0, own=2.0, others=0.0)
    assert gov.tick(1) == 2  # the cap (the start count), not the 2 + idle cores


def test_a_count_set_by_someone_else_becomes_the_cap() -> None:
    cpu = FakeCpu()
    gov, calls = governor(cpu)
    assert gov.tick(1) == 1 and gov.cap == 1  # a pipeline worker gave this stage one thread
    cpu.run(wall=3.0, own=3.0, others=0.0)
    assert gov.tick(1) == 1 and calls == []


def test_posttrain_threads_fixes_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_governor", None)
    monkeypatch.setattr(threads, "_off", False)
    monkeypatch.setenv(threads.ENV, "1")
    try:
        assert threads.govern_threads() == 1 and threads._off
        assert threads.govern_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_proc_stat_is_read() -> None:
    sample = threads.read_sample(threads._allowed_cpus())
    assert sample is not None and sample.busy > 0 and sample.own > 0
