"""Preference data as token sequences: (chosen, rejected) pairs, and KTO's unpaired examples.

Rows follow TRL's conventions: ``{"prompt", "chosen", "rejected"[, "margin"]}`` for pairs,
``{"prompt", "completion", "label": bool}`` for unpaired feedback (paired rows are split into
two unpaired ones, the chosen desirable and the rejected not, as the KTO paper does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from posttrain.data.chat import Encoded, encode_preference, encode_prompt_completion
from posttrain.data.mixture import DataSpec, describe, log_counts
from posttrain.data.sources import load_rows, load_sources
from posttrain.errors import DataError

log = logging.getLogger("posttrain")


@dataclass
class Pair:
    """One example: two sequences (chosen, rejected) or, for KTO, (completion, mismatched
    completion for the KL estimate); ``label`` is KTO's desirable flag, ``margin`` the
    optional reward-model margin."""

    a: Encoded
    b: Encoded
    index: int
    margin: float = 0.0
    label: bool = True


@dataclass
class PairSet:
    """Encoded examples and what loading them dropped. ``paired``: (chosen, rejected) pairs;
    False for KTO's unpaired examples, whose ``b`` is only the KL estimate's sequence."""

    examples: list[Pair]
    rows: int
    skipped_rows: int
    truncated: int
    dropped: int
    paired: bool = True

    def stats(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}/rows": self.rows, f"{prefix}/pairs": len(self.examples),
                f"{prefix}/skipped_rows": self.skipped_rows,
                f"{prefix}/truncated_rows": self.truncated, f"{prefix}/dropped_rows": self.dropped}

    def sequences(self) -> list[Encoded]:
        return [s for p in self.examples for s in (p.a, p.b)]


def _usable(a: Encoded, b: Encoded, paired: bool) -> bool:
    # Truncation can empty a response or make chosen == rejected: such a pair teaches nothing.
    return a.num_targets > 0 and b.num_targets > 0 and not (paired and a.input_ids == b.input_ids)


def _finish(spec: str, examples: list[Pair], rows: int, skipped: int, truncated: int,
            dropped: int, max_length: int, paired: bool) -> PairSet:
    if truncated:
        log.warning("%s: %d of %d rows truncated to max_length=%d", spec, truncated, rows,
                    max_length)
    if dropped:
        log.warning("%s: %d rows dropped (a response empty, or chosen == rejected, after "
                    "truncation to max_length=%d)", spec, dropped, max_length)
    if not examples:
        raise DataError(f"{spec}: no usable preference row (is max_length={max_length} shorter "
                        "than the prompts?)")
    return PairSet(examples, rows, skipped, truncated, dropped, paired)


def encode_pairs(spec: DataSpec, tokenizer: Any, *, max_length: int, on_bad_row: str = "error",
                 split: str = "train") -> PairSet:
    """Validated preference rows -> (chosen, rejected) pairs. Bad rows (missing field, empty
    response, chosen == rejected) raise DataError, or are counted when ``on_bad_row=skip``."""
    rows = load_rows(spec, split=split, formats=("preference",), on_bad_row=on_bad_row)
    out, truncated, dropped = [], 0, 0
    for row in rows.rows:
        c, r = encode_preference(tokenizer, row, max_length)
        truncated += c.truncated or r.truncated
        if not _usable(c, r, paired=True):
            dropped += 1
            continue
        out.append(Pair(c, r, len(out), margin=float(row.get("margin") or 0.0)))
    return _finish(rows.source, out, len(rows.rows), rows.skipped, truncated, dropped,
                   max_length, paired=True)


def unpaired_rows(spec: DataSpec, *, split: str, on_bad_row: str) -> tuple[list[tuple], int]:
    """(prompt, completion, desirable) triples; preference rows are split into two (the
    chosen desirable, the rejected not), as KTO's paper does for paired data. Each source of
    a mixture is converted on its own, so unpaired and preference sources mix."""
    loaded = load_sources(spec, split=split, formats=("unpaired", "preference"),
                          on_bad_row=on_bad_row)
    if not isinstance(spec, str):
        log_counts([(part, len(rows)) for part, rows in loaded], split)
    items = []
    for _, rows in loaded:
        if rows.format == "unpaired":
            items += [(r["prompt"], r["completion"], bool(r["label"])) for r in rows.rows]
            continue
        for r in rows.rows:
            items += [(r["prompt"], r["chosen"], True), (r["prompt"], r["rejected"], False)]
    return items, sum(rows.skipped for _, rows in loaded)


def encode_unpaired(spec: DataSpec, tokenizer: Any, *, max_length: int,
                    on_bad_row: str = "error", split: str = "train") -> PairSet:
    """KTO examples: each completion with a *mismatched* one (another row's completion after
    this row's prompt), whose log-ratio estimates KL(pi || pi_ref) (KTO paper, §4.1)."""
    items, skipped = unpaired_rows(spec, split=split, on_bad_row=on_bad_row)
    n = len(items)
    # Two rows ahead: auto-unpaired data interleaves (chosen, rejected) of one prompt.
    step = 2 if n > 2 else 1
    out, truncated, dropped = [], 0, 0
    for i, (prompt, completion, label) in enumerate(items):
        y = encode_prompt_completion(tokenizer, prompt, completion, max_length)
        kl = encode_prompt_completion(tokenizer, prompt, items[(i + step) % n][1], max_length)
        truncated += y.truncated
        if not _usable(y, kl, paired=False):
            dropped += 1
            continue
        out.append(Pair(y, kl, len(out), label=label))
    return _finish(describe(spec), out, n, skipped, truncated, dropped, max_length,
                   paired=False)
