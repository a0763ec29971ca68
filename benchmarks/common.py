"""Benchmark helpers shared by every side-by-side benchmark (SFT now; DPO/GRPO/PPO later).

- ``matmul_peak``: the machine's bf16 (or fp32) GEMM FLOP/s, measured in the same run, since
  a shared machine's speed moves from minute to minute.
- ``train_flops_per_token``: model FLOPs of one training token (forward + backward), the same
  formula for both sides, so MFU ratios equal throughput ratios.
- ``StepClock`` / ``throughput``: wall-clock from one step's end to the next (data loading,
  logging and the optimizer included), warm-up steps dropped.
- ``run_side``: each side runs in a fresh subprocess, so its peak RSS is its own.
- ``allocator_side_env`` / ``host_allocator`` / ``optimizer_name``: the fairness rules every
  side-by-side benchmark shares: both sides start under the same host allocator and report
  the allocator and optimizer they actually ran with, so a table can show that they match.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, seconds: float = 3.0,
                device: str = "cpu") -> float:
    """Best observed FLOP/s of an (n, n) @ (n, n) GEMM in ``dtype`` (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b  # warm-up: thread pool, kernel selection
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def train_flops_per_token(config: Any, seq_lens: float | Sequence[int],
                          lm_head_frac: float = 1.0) -> float:
    """Training FLOPs per token: 6 N + attention (Kaplan et al. 2020; PaLM appendix B).

    N counts every matmul weight a token passes through: the transformer blocks and, for a
    fraction ``lm_head_frac`` of the tokens, the LM head over the full vocabulary (tied or
    not); never the embedding lookup. ``lm_head_frac`` < 1 is the strict count for a loss
    that needs logits only at target tokens (SFT's response mask): projecting the others is
    work the task does not need, so it is not counted on either side.

    Attention: the causal QK^T and AV products, 2 matmuls x 2 FLOPs x d per key, times 3 for
    forward + backward. With ``seq_lens`` the rows' lengths, a token at position i of its
    row attends i + 1 keys, so the per-token term is 12 L d sum_r l_r (l_r + 1) / 2 / sum_r
    l_r (token-weighted: long rows hold more tokens). A float is a mean length l, with l / 2
    keys per token (the older, row-mean approximation).
    """
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o + k, v
    mlp = 3 * d * config.intermediate_size  # gate, up, down
    n_matmul = L * (attn + mlp) + lm_head_frac * d * V
    if isinstance(seq_lens, int | float):
        keys_per_token = seq_lens / 2
    else:
        keys_per_token = sum(n * (n + 1) / 2 for n in seq_lens) / sum(seq_lens)
    return 6 * n_matmul + 12 * L * heads * head_dim * keys_per_token


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StepClock:
    """Timestamps at each step's end, and the tokens each step processed."""

    ends: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def step_done(self, tokens: int) -> None:
        self.ends.append(time.perf_counter())
        self.tokens.append(int(tokens))


def throughput(clock: StepClock, warmup: int) -> dict[str, float]:
    """Tokens/s and s/step over the steps after ``warmup`` (needs >= warmup + 1 steps)."""
    if len(clock.ends) <= warmup:
        raise ValueError(f"only {len(clock.ends)} steps timed; need more than warmup={warmup}")
    t0 = clock.ends[warmup - 1] if warmup > 0 else clock.start
    dt = clock.ends[-1] - t0
    tokens = sum(clock.tokens[warmup:])
    steps = len(clock.ends) - warmup
    return {"tokens_per_s": tokens / dt, "s_per_step": dt / steps, "timed_steps": steps,
            "timed_tokens": tokens}


def run_side(args: list[str], timeout: float = 3600, env: dict[str, str] | None = None,
             module: str = "benchmarks.run") -> dict[str, Any]:
    """Run ``python -m <module> <args>`` in a fresh process; its last stdout line is JSON."""
    base = env if env is not None else dict(os.environ)
    env = {**base, "PYTHONPATH": f"{REPO}{os.pathsep}{base.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark side {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- fairness: the same host allocator and optimizer on both sides -------------------------

ALLOCATOR_MODES = ("tuned", "plain")
# The glibc settings posttrain's engine applies in-process through mallopt
# (``posttrain.train.allocator.keep_freed_memory``), as environment variables a peer's
# process reads at start-up: no mmap for large blocks, never trim the heap.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
ALLOCATOR_HELP = ("host allocator of every side: tuned = what the posttrain command starts "
                  "with (tcmalloc or jemalloc preloaded when installed, else glibc with "
                  "mmap off and no trim), given to TRL too; plain = glibc's defaults on both "
                  "sides (posttrain's in-process glibc tuning off too), what a TRL user's "
                  "python gets")


def allocator_side_env(env: dict[str, str], mode: str) -> dict[str, str]:
    """``env`` for a side started under host allocator ``mode``; the same for every side
    (posttrain or peer), so two sides of one mode run under the same allocator.

    ``tuned``: the ``posttrain`` command's choice (``allocator_env``: ``LD_PRELOAD`` of
    tcmalloc/jemalloc with its keep-memory settings), or, when none is installed, glibc with
    ``MALLOC_ENV`` (what posttrain's engine sets in-process anyway). ``plain``: glibc with its
    defaults: no preload chosen, and posttrain's in-process tuning off
    (``POSTTRAIN_MALLOC_TUNING=0``). Each side reports what it really ran under
    (``host_allocator``)."""
    from posttrain.train.allocator import CHOICE_VAR, allocator_env

    if mode == "plain":
        return {k: v for k, v in env.items() if k not in MALLOC_ENV} | {
            CHOICE_VAR: "glibc", "POSTTRAIN_MALLOC_TUNING": "0"}
    if mode == "tuned":
        return {**env, **(allocator_env(env) or MALLOC_ENV)}
    raise ValueError(f"allocator mode {mode!r}: expected one of {ALLOCATOR_MODES}")


def host_allocator() -> str:
    """The host allocator this process runs under: ``tcmalloc`` / ``jemalloc`` (preloaded),
    ``glibc+tuning`` (mmap off, no trim: ``MALLOC_ENV``, or posttrain's in-process mallopt
    unless ``POSTTRAIN_MALLOC_TUNING=0``) or ``glibc``. Call it after the side ran (so
    posttrain's engine has applied its tuning)."""
    from posttrain.train.allocator import preloaded_allocator

    name = preloaded_allocator()
    if name:
        return name
    env_tuned = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    return "glibc+tuning" if env_tuned else "glibc"


def optimizer_name(opt: Any) -> str:
    """``AdamW (fused)``, ``AdamW (foreach)`` or ``AdamW (not fused)``: the optimizer class
    and whether it runs torch's fused kernel, for the tables."""
    while hasattr(opt, "optimizer"):  # accelerate / transformers wrap the torch optimizer
        opt = opt.optimizer
    d = getattr(opt, "defaults", {})
    impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "not fused"
    return f"{type(opt).__name__} ({impl})"


def same(values: list[str]) -> str:
    """The one value all sides share, or ``MISMATCH: a / b`` (a table then shows it)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "MISMATCH: " + " / ".join(distinct)


def side_env(policy: str) -> dict[str, str]:
    """The threading environment every side runs under (``--omp-wait-policy``).

    libgomp's default wait policy spins idle OpenMP threads; on a machine whose cores are
    busy with other jobs a spinning thread steals the core its partner needs, and every
    parallel op then waits for a preempted thread: a 1600x1536 elementwise op measured 32 ms
    with two spinning threads vs 1 ms with ``OMP_WAIT_POLICY=PASSIVE`` (load ~8 on 2 cores).
    ``default`` leaves libgomp's policy alone (what a user who sets nothing gets).
    """
    env = dict(os.environ)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def reexec_with_omp_policy(policy: str, module: str) -> None:
    """Restart this process (``python -m module``, same arguments) with ``OMP_WAIT_POLICY``
    set, unless it already is (libgomp reads it once, when torch loads). ``default`` leaves
    the environment alone. Why: see ``side_env``."""
    if policy == "default" or os.environ.get("OMP_WAIT_POLICY", "").lower() == policy:
        return
    env = {**os.environ, "OMP_WAIT_POLICY": policy.upper()}
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def median_ratio(ours: list[float], peer: list[float]) -> float:
    """Median of the per-round ratios ours[i] / peer[i] (rounds alternate the two sides)."""
    import statistics

    return statistics.median(a / b for a, b in zip(ours, peer, strict=True))


def random_words(rng: random.Random, n: int) -> str:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fu", "ga", "hi"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
                    for _ in range(n))


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])
