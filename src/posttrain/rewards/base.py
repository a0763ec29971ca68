"""The RewardFn protocol (DESIGN.md §2), weighted composition, and failure containment.

    fn(prompts, completions, **columns) -> list[float | None]

``prompts`` are the rows' prompts (strings or message lists), ``completions`` the decoded
completion texts, and every other dataset column (``answer``, ``tests``, ...) arrives as a
keyword list aligned with them. ``None`` means "not applicable to this row".

``RewardSet`` calls several functions, each guarded: an exception or a call that exceeds
``timeout_s`` is logged, counted (``reward/<name>/errors``, ``reward/<name>/timeouts``) and
scored ``on_error`` for that call's rows; the run goes on. The total is the weighted sum of
the functions' rewards, a ``None`` counting as 0.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

log = logging.getLogger("posttrain")


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 **columns: Any) -> list[float | None]: ...


def reward_name(fn: Any) -> str:
    return str(getattr(fn, "__name__", type(fn).__name__))


def call_with_timeout(fn: Any, timeout_s: float | None, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a daemon thread; raises TimeoutError after ``timeout_s``.

    A Python thread cannot be killed: a hung call is abandoned (it keeps its thread until it
    returns) and the caller moves on. Code that can truly hang forever or exhaust memory
    belongs in ``posttrain.sandbox`` (the code reward runs there).
    """
    if timeout_s is None or timeout_s <= 0:
        return fn(*args, **kwargs)
    box: queue.Queue = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            box.put((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box.put((False, e))

    threading.Thread(target=run, daemon=True, name="posttrain-reward").start()
    try:
        ok, value = box.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"reward call exceeded {timeout_s:g} s") from None
    if not ok:
        raise value
    return value


@dataclass
class RewardOutput:
    """Rewards of one batch: ``total`` (N,), ``per_fn`` name -> (N,) (NaN where None)."""

    total: torch.Tensor
    per_fn: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


class RewardSet:
    """Weighted sum of reward functions with per-call containment.

    ``weights`` default to 1 each. ``timeout_s`` bounds each function's call for a whole
    batch; ``on_error`` is the score given to every row of a call that raised or timed out.
    ``totals`` counts errors and timeouts over the run.
    """

    def __init__(self, fns: Sequence[Any], weights: Sequence[float] | None = None, *,
                 timeout_s: float | None = 60.0, on_error: float = 0.0):
        if not fns:
            raise ValueError("RewardSet needs at least one reward function")
        weights = list(weights) if weights else [1.0] * len(fns)
        if len(weights) != len(fns):
            raise ValueError(f"{len(fns)} reward functions but {len(weights)} weights")
        self.fns, self.weights = list(fns), weights
        self.names = _unique([reward_name(f) for f in fns])
        self.timeout_s, self.on_error = timeout_s, on_error
        self.totals: dict[str, int] = {}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str],
                 **columns: Any) -> RewardOutput:
        n = len(completions)
        total = torch.zeros(n)
        per_fn: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        for fn, w, name in zip(self.fns, self.weights, self.names, strict=True):
            values = self._guarded(fn, name, n, prompts, completions, columns, metrics)
            r = torch.tensor([float("nan") if v is None else float(v) for v in values])
            per_fn[name] = r
            total += w * torch.nan_to_num(r, nan=0.0)
            valid = r[~r.isnan()]
            metrics[f"reward/{name}/mean"] = float(valid.mean()) if len(valid) else float("nan")
            metrics[f"reward/{name}/std"] = float(valid.std(correction=0)) if len(valid) else 0.0
            for k, v in getattr(fn, "last_stats", {}).items():
                metrics[k] = float(v)
        metrics["reward/mean"] = float(total.mean())
        metrics["reward/std"] = float(total.std(correction=0))
        return RewardOutput(total, per_fn, metrics)

    def _guarded(self, fn: Any, name: str, n: int, prompts: Sequence[Any],
                 completions: Sequence[str], columns: dict[str, Any],
                 metrics: dict[str, float]) -> list[float | None]:
        errors = timeouts = 0
        try:
            values = call_with_timeout(fn, self.timeout_s, prompts, completions, **columns)
            values = list(values)
            if len(values) != n:
                raise ValueError(f"returned {len(values)} rewards for {n} completions")
        except TimeoutError as e:
            timeouts = 1
            log.warning("reward %s: %s; its %d rows scored %s", name, e, n, self.on_error)
            values = [self.on_error] * n
        except Exception as e:  # a broken reward must not kill the run
            errors = 1
            log.warning("reward %s raised %r; its %d rows scored %s", name, e, n, self.on_error)
            values = [self.on_error] * n
        for key, v in (("errors", errors), ("timeouts", timeouts)):
            self.totals[f"{name}/{key}"] = self.totals.get(f"{name}/{key}", 0) + v
            metrics[f"reward/{name}/{key}"] = float(self.totals[f"{name}/{key}"])
        metrics[f"reward/{name}/none_frac"] = sum(v is None for v in values) / max(n, 1)
        return values


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
