"""References to other stages inside string values: ``${sft.output}``, ``${sft.dir}``.

``output`` is the stage's model directory (a training stage's ``final/``), ``dir`` its run
directory. A reference may sit anywhere in a string (``data: ${gen.dir}/pairs.jsonl``), in
lists and in nested mappings. Rounds of a repeated stage are named ``dpo@1``, ``dpo@2``...
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError

STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_REF = re.compile(r"\$\{([^{}]*)\}")
_TARGET = re.compile(r"(?P<stage>[A-Za-z_][A-Za-z0-9_-]*(?:@\d+)?)\.(?P<attr>output|dir)")
ATTRS = ("output", "dir")


@dataclass(frozen=True)
class Ref:
    stage: str  # the stage referred to, e.g. "sft" or "dpo@2"
    attr: str  # "output" or "dir"

    def text(self) -> str:
        return "${" + f"{self.stage}.{self.attr}" + "}"


class RefError(ConfigError):
    """A malformed reference; ``key`` is the dotted key it was written under."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _parse(inner: str, path: str) -> Ref:
    m = _TARGET.fullmatch(inner.strip())
    if m is None:
        raise RefError(f"bad reference '${{{inner}}}': write ${{STAGE.output}} (its model) "
                       f"or ${{STAGE.dir}} (its run directory)", path)
    return Ref(m["stage"], m["attr"])


def substitute(value: Any, fn: Callable[[Ref, str], str], path: str = "") -> Any:
    """``value`` with every reference replaced by ``fn(ref, path)``; ``path`` is the dotted
    key the string sits under, so callers can say where a bad reference was written."""
    if isinstance(value, str):
        return _REF.sub(lambda m: fn(_parse(m[1], path), path), value)
    if isinstance(value, list):
        return [substitute(v, fn, path) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, fn, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    return value


def find_refs(value: Any, path: str = "") -> list[tuple[Ref, str]]:
    """Every (reference, dotted key) in ``value``; a malformed one raises RefError."""
    found: list[tuple[Ref, str]] = []

    def keep(ref: Ref, where: str) -> str:
        found.append((ref, where))
        return ""

    substitute(value, keep, path)
    return found
