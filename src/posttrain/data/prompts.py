"""Prompt-only rows for online RL and evaluation: loading, token ids, and a resumable cursor.

A prompt row is ``{"prompt": str | messages, ...truth columns}`` (``answer``, ``tests``,
``harmful``...); ``encode_prompts`` adds ``_ids``, the prompt rendered by the chat template
with the generation prompt, which is what the rollout engine consumes.
"""

from __future__ import annotations

import logging
from typing import Any

from posttrain.data.batching import BatchStream
from posttrain.data.chat import render_prompt
from posttrain.data.mixture import DataSpec, describe, log_counts, parse_mixture, weighted
from posttrain.data.sources import load_rows, parse_task_spec
from posttrain.errors import DataError

log = logging.getLogger("posttrain")

Row = dict[str, Any]


def load_prompt_rows(spec: DataSpec, split: str = "train", on_bad_row: str = "error") -> list[Row]:
    """Prompt-only rows (+ truth columns): a file, ``task:NAME[:k=v]``, ``rg:NAME[:k=v]``, or
    a mixture of these (``data/mixture.py``)."""
    if isinstance(spec, str):
        return _source_prompt_rows(spec, split, on_bad_row)
    loaded = [(part, weighted(_source_prompt_rows(part.source, split, on_bad_row), part))
              for part in parse_mixture(spec)]
    log_counts([(part, len(rows)) for part, rows in loaded], split)
    rows = [row for _, rows in loaded for row in rows]
    # A column only some sources have is None in the other rows (as concatenated datasets
    # do), so every batch passes rewards every column, None where it does not apply.
    blank = dict.fromkeys(k for row in rows for k in row)
    return [{**blank, **row} for row in rows]


def _source_prompt_rows(spec: str, split: str, on_bad_row: str) -> list[Row]:
    if spec.startswith("rg:"):
        from posttrain.tasks.rl import rg_rows

        name, params = parse_task_spec(spec.removeprefix("rg:"))
        return rg_rows(name, split=str(params.pop("split", split)), **params)
    return load_rows(spec, split=split, formats=("prompt_only",),
                     on_bad_row=on_bad_row).rows  # type: ignore[arg-type]


def encode_prompts(rows: list[Row], tokenizer: Any, max_prompt: int,
                   spec: DataSpec) -> list[Row]:
    """Attach token ids (``_ids``); rows whose prompt leaves no room to generate are dropped."""
    out = [{**r, "_ids": render_prompt(tokenizer, r["prompt"])} for r in rows]
    kept = [r for r in out if len(r["_ids"]) <= max_prompt]
    if len(kept) < len(out):
        log.warning("%s: %d prompts longer than max_length - max_new_tokens = %d tokens; dropped",
                    describe(spec), len(out) - len(kept), max_prompt)
    if not kept:
        raise DataError(f"{describe(spec)}: no prompt fits in max_length - max_new_tokens = "
                        f"{max_prompt}")
    return kept


def truth_columns(rows: list[Row]) -> dict[str, list[Any]]:
    """Every column but the prompt and its ids, as aligned lists (a RewardFn's ``**columns``)."""
    keys = [k for k in rows[0] if k not in ("prompt", "_ids")]
    return {k: [r.get(k) for r in rows] for k in keys}


class PromptCursor:
    """An endless, shuffled, resumable walk over prompt rows (``BatchStream`` order: epoch
    ``e`` is a permutation drawn from ``seed + e``). ``next(n)`` returns exactly ``n`` rows, an
    epoch's short tail topped up from the next, so every step sees the same number."""

    def __init__(self, rows: list[Row], per_step: int, seed: int):
        self.rows = rows
        self.stream = BatchStream(rows, per_step, list, seed=seed)

    def next(self, n: int) -> list[Row]:
        out: list[Row] = []
        while len(out) < n:
            out += self.stream.next()[: n - len(out)]
        return out

    def state(self) -> dict[str, int]:
        return self.stream.state()

    def load_state(self, state: dict[str, int]) -> None:
        self.stream.load_state(state)
