"""Data mixtures: several sources read as one dataset.

A ``data`` value is one source spec (``sources.load_rows``) or a list of entries, each a
spec or a mapping ``{source: SPEC, times: T}``. The sources' rows are concatenated in the
order given; ``times`` weights a source: its rows ``floor(T)`` times over, plus a fixed
sample (seeded by the spec, so every run draws the same rows) of ``round(frac(T) * n)`` of
them, and at least one row in all.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from posttrain.errors import ConfigError

log = logging.getLogger("posttrain")

# One source spec, or a mixture: a list of specs and {source, times} mappings.
DataSpec = str | list[Any]

T = TypeVar("T")

ENTRY_KEYS = ("source", "times")
MIXTURE_KEYS = ("data", "eval_data")  # the config keys that take a mixture

# "b=2" right after a task spec: YAML flow lists split at commas, so an unquoted
# `[task:x:a=1,b=2]` arrives as ["task:x:a=1", "b=2"].
_SPLIT_PARAM = re.compile(r"[A-Za-z_]\w*=[\w.+-]*")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Part:
    """One source of a mixture and its weight."""

    source: str
    times: float = 1.0

    @property
    def label(self) -> str:
        return self.source if self.times == 1 else f"{self.source} (times {self.times:g})"


def parse_mixture(spec: DataSpec) -> list[Part]:
    """The parts of ``spec``: one for a plain spec; a ConfigError names a bad entry."""
    if isinstance(spec, str):
        return [Part(spec)]
    if not isinstance(spec, list | tuple):
        raise ConfigError(f"expected a data source spec or a list of them, got {spec!r}")
    if not spec:
        raise ConfigError("an empty data mixture: list at least one source")
    parts = [_part(entry, i) for i, entry in enumerate(spec)]
    for i, (before, entry) in enumerate(zip(spec, spec[1:], strict=False), start=1):
        if _split_param(before, entry):
            raise ConfigError(
                f"data mixture entry {i + 1} ({entry!r}) looks like a parameter of the task "
                f"spec before it, split off at the comma by YAML: quote the spec "
                f'(["{before},{entry}", ...]) or write the list one entry per line'
            )
    return parts


def _split_param(before: Any, entry: Any) -> bool:
    return (
        isinstance(before, str)
        and before.startswith(("task:", "rg:"))
        and isinstance(entry, str)
        and _SPLIT_PARAM.fullmatch(entry) is not None
        and not entry.endswith(_FILE_SUFFIXES)
    )


def _part(entry: Any, i: int) -> Part:
    where = f"data mixture entry {i + 1} ({entry!r})"
    if isinstance(entry, str):
        if not entry.strip():
            raise ConfigError(f"{where}: an empty source spec")
        return Part(entry)
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a source spec or {{source: SPEC, times: N}}")
    unknown = [str(k) for k in entry if k not in ENTRY_KEYS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; an entry takes {' and '.join(ENTRY_KEYS)}"
        )
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}: 'source' needs a source spec (a file, task:NAME, ...)")
    return Part(source, _times(entry.get("times", 1), where))


def _times(value: Any, where: str) -> float:
    # bool is an int in Python, but `times: yes` is a typo, not a weight.
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: 'times' must be a number > 0, got {value!r}")
    return float(value)


def describe(spec: DataSpec) -> str:
    """What messages call the data: the spec itself, or its sources joined by ``+``."""
    if isinstance(spec, str):
        return spec
    try:
        return " + ".join(part.label for part in parse_mixture(spec))
    except ConfigError:
        return str(spec)


def sources(spec: DataSpec) -> list[str]:
    """The source specs of ``spec``, in order."""
    return [part.source for part in parse_mixture(spec)]


def weighted(rows: Sequence[T], part: Part) -> list[T]:
    """``rows`` as ``part.times`` weights them (the module docstring); order is kept."""
    whole, frac = divmod(part.times, 1.0)
    extra = math.floor(frac * len(rows) + 0.5)
    if whole == 0:
        extra = max(extra, 1)
    if extra == 0:
        return list(rows) * int(whole)
    # A fixed shuffle, so a larger fraction draws a superset of a smaller one's rows.
    order = list(range(len(rows)))
    random.Random(f"mixture:{part.source}").shuffle(order)
    picked = sorted(order[:extra])
    return list(rows) * int(whole) + [rows[i] for i in picked]


def log_counts(counts: Sequence[tuple[Part, int]], split: str) -> None:
    """One log line: how many rows each source gave the mixture."""
    total = sum(n for _, n in counts)
    log.info(
        "data mixture (%s split): %d rows = %s",
        split,
        total,
        ", ".join(f"{n} from {part.label}" for part, n in counts),
    )
