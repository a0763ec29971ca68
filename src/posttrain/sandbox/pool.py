"""Many programs in parallel: :func:`run_many`.

Threads are enough: each one only waits on a sandboxed child process, which does the work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from posttrain.sandbox.config import SandboxConfig, SandboxResult
from posttrain.sandbox.runner import make_config, resolve_isolation, run_program


def default_workers() -> int:
    # Start-up (fork, exec, namespace setup) waits on the kernel, so a few more threads than
    # cores keeps the cores busy; see benchmarks/sandbox_bench.py. torchrun's ranks on one
    # node (LOCAL_WORLD_SIZE) share its cores: one pool per node, split between them.
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, 2 * (os.cpu_count() or 1) // local_ranks)


def run_many(programs: Sequence[str], *, workers: int | None = None,
             stdins: Sequence[str | None] | None = None, config: SandboxConfig | None = None,
             **overrides: Any) -> list[SandboxResult]:
    """Run every program in its own sandbox, ``workers`` at a time; results keep the order.

    Keyword overrides are :class:`SandboxConfig` fields and apply to every program.
    Raises :class:`SandboxUnavailableError` up front (before any run) when isolation is
    unavailable; never raises for what a program does.
    """
    cfg = make_config(config, overrides)
    if stdins is not None and len(stdins) != len(programs):
        raise ValueError(f"{len(stdins)} stdins for {len(programs)} programs")
    if not programs:
        return []
    resolve_isolation(cfg.isolation)
    inputs = list(stdins) if stdins is not None else [None] * len(programs)
    n = max(1, min(workers or default_workers(), len(programs)))

    def one(i: int) -> SandboxResult:
        return run_program(programs[i], stdin=inputs[i], config=cfg)

    if n == 1:
        return [one(i) for i in range(len(programs))]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, range(len(programs))))
