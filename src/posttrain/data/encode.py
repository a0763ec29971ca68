"""A dataset of SFT/pretraining rows, validated and tokenized with its loss masks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from posttrain.data.chat import Encoded, encode_row
from posttrain.data.mixture import DataSpec
from posttrain.data.sources import load_rows
from posttrain.errors import DataError

log = logging.getLogger("posttrain")


@dataclass
class EncodedSet:
    examples: list[Encoded]
    source: str
    truncated: int
    skipped_rows: int
    empty: int

    def stats(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}/rows": len(self.examples), f"{prefix}/truncated_rows": self.truncated,
                f"{prefix}/skipped_rows": self.skipped_rows, f"{prefix}/no_target_rows": self.empty}


def encode_dataset(
    spec: DataSpec, tokenizer: Any, *, formats: tuple[str, ...], max_length: int,
    on_bad_row: str, split: str = "train",
) -> EncodedSet:
    """Load, validate and tokenize a dataset (or mixture); rows left with no target token are
    dropped."""
    rows = load_rows(spec, split=split, formats=formats, on_bad_row=on_bad_row)
    name = rows.source
    examples, truncated, empty = [], 0, 0
    for row in rows.rows:
        enc = encode_row(tokenizer, row, rows.format, max_length=max_length)
        truncated += enc.truncated
        if sum(enc.loss_mask) == 0:
            empty += 1
            continue
        examples.append(enc)
    if truncated:
        log.warning("%s: %d of %d rows truncated to max_length=%d",
                    name, truncated, len(rows.rows), max_length)
    if not examples:
        raise DataError(f"{name}: no row has a token to train on (loss mask empty everywhere; "
                        f"is max_length={max_length} shorter than the prompts?)")
    if empty:
        log.warning("%s: %d rows have no target token after truncation; dropped", name, empty)
    return EncodedSet(examples, name, truncated, rows.skipped, empty)
