"""Registry of built-in tasks: deterministic row generators addressed as ``task:NAME``.

A task is a function ``fn(split, size, seed, **params) -> list[dict]`` returning rows in one of
the formats of ``posttrain.data.formats``. Splits are disjoint by construction (held-out rows
never appear in ``train``), and the same (split, size, seed) always gives the same rows. The
task modules register themselves when the ``posttrain.tasks`` package is imported
(``posttrain`` itself does not import it).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from posttrain.errors import DataError

TaskFn = Callable[..., list[dict[str, Any]]]
_TASKS: dict[str, tuple[TaskFn, str]] = {}


def register_task(name: str, doc: str) -> Callable[[TaskFn], TaskFn]:
    def deco(fn: TaskFn) -> TaskFn:
        _TASKS[name] = (fn, doc)
        return fn

    return deco


def list_tasks() -> dict[str, str]:
    """Task name -> one-line description."""
    return {name: doc for name, (_, doc) in sorted(_TASKS.items())}


def build_task_rows(
    name: str, *, split: str = "train", size: int | None = None, seed: int = 0, **params: Any
) -> list[dict[str, Any]]:
    """Rows of built-in task ``name``; unknown names raise DataError with the closest match."""
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=1)
        hint = f"; did you mean 'task:{close[0]}'?" if close else ""
        raise DataError(f"unknown task 'task:{name}'{hint} (known: {', '.join(sorted(_TASKS))})")
    fn, _ = _TASKS[name]
    try:
        return fn(split=split, size=size, seed=seed, **params)
    except TypeError as e:
        raise DataError(f"task:{name}: bad parameter ({e})") from None
