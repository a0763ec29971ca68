"""Sandbox throughput: trivial programs through ``run_many``, reported as runs per second.

    python benchmarks/sandbox_bench.py [--runs 200] [--workers 1,2,4,8] [--isolation auto]

Target (issue 7): >= 20 sandboxed runs/s on 2 cores. Every run is a full sandbox: bwrap with
fresh namespaces, the rlimit launcher, a new interpreter. Also prints the cost of one run
broken down by what it adds, measured on the same machine in the same process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from posttrain.sandbox import SandboxConfig, run_many, run_program

PROGRAM = "print(sum(range(10)))"


def bare_python_ms(n: int = 20) -> float:
    """Start-up of a plain `python -I -S -c` for scale (no sandbox at all)."""
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([sys.executable, "-I", "-S", "-c", PROGRAM], check=True,
                       stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0) / n * 1e3


def throughput(runs: int, workers: int, cfg: SandboxConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    results = run_many([PROGRAM] * runs, workers=workers, config=cfg)
    dt = time.perf_counter() - t0
    ok = sum(r.passed and r.stdout.strip() == "45" for r in results)
    return runs / dt, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "limits-only"])
    a = p.parse_args(argv)
    cfg = SandboxConfig(isolation=a.isolation)
    run_program(PROGRAM, config=cfg)  # warm-up: probe bwrap, page in the interpreter
    print(f"cores: {os.cpu_count()}  isolation: {run_program(PROGRAM, config=cfg).isolation}  "
          f"runs: {a.runs}")
    print(f"bare `python -I -S` start-up: {bare_python_ms():.1f} ms (no sandbox, for scale)")
    one = [run_program(PROGRAM, config=cfg).duration_s for _ in range(20)]
    print(f"one sandboxed run, sequential: {sorted(one)[len(one) // 2] * 1e3:.1f} ms (median)")
    best = 0.0
    for w in (int(x) for x in a.workers.split(",")):
        rate, ok = throughput(a.runs, w, cfg)
        best = max(best, rate)
        print(f"workers={w:<3d} {rate:7.1f} runs/s   ({ok}/{a.runs} passed)")
    print(f"best: {best:.1f} runs/s (target >= 20 on 2 cores)")
    return 0 if best >= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
