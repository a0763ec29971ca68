"""Option checks, declared beside the options and run wherever a config is parsed.

A config class declares two tables as class attributes; both are merged along its base
classes (a subclass entry replaces its parent's), and keys may be dotted into a group:

    RANGES: ClassVar[dict[str, str]] = {"lr": "> 0", "label_smoothing": "[0, 0.5)"}
    ONLY_WITH: ClassVar[dict[str, Needs]] = {"simpo_gamma": Needs("loss", ("simpo",))}

``RANGES`` bounds a number: ``> 0``, ``>= 1``, ``< 1``, ``<= 1``, an interval ``[0, 1)``, or
just ``finite``; NaN and infinities are always out of range, and a null (optional) value is
not checked.
``ONLY_WITH`` names the options that take effect only under some other option's value: given
(different from its default) without it, the option would silently do nothing, so it is an
error. ``loader.validate_config`` checks the ranges of every config, nested groups first,
each followed by its own ``validate()`` (rules that fit no table), and then, once all values
are known to be valid, every ``ONLY_WITH``. Every message is one line that starts with the
dotted key:

    label_smoothing must be in [0, 0.5), got 0.7
    lora.alpha=32.0 has no effect with lora.r=0: it is used only when lora.r >= 1
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from posttrain.errors import ConfigError


class UnusedOptionError(ConfigError):
    """An option was given that has no effect under the other options (``key`` is dotted)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``key`` across process boundaries
        return type(self), (str(self), self.key)


@dataclass(frozen=True)
class Needs:
    """An option takes effect only when option ``on`` (dotted, relative to the same config)
    is one of the choices ``values`` (for a list option: contains one), is in the range
    ``values`` (a ``RANGES`` spec), or, with ``values=None``, is set at all (not null or
    empty). ``why`` is added to the message."""

    on: str
    values: tuple[Any, ...] | str | None = None
    why: str = ""


class _Bounds(NamedTuple):
    low: float
    high: float
    low_open: bool
    high_open: bool


_COMPARE = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


@functools.cache
def _bounds(spec: str) -> _Bounds:
    spec = spec.strip()
    if spec == "finite":
        return _Bounds(-math.inf, math.inf, True, True)
    m = _COMPARE.match(spec)
    if m is not None:
        op, x = m[1], float(m[2])
        if op.startswith(">"):
            return _Bounds(x, math.inf, op == ">", True)
        return _Bounds(-math.inf, x, True, op == "<")
    m = _INTERVAL.match(spec)
    if m is None:  # a typo in a config class, not user input
        raise ValueError(f"bad range spec {spec!r}: use '> 0', '>= 1', '[0, 1)' or 'finite'")
    return _Bounds(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")")


def in_range(value: float, spec: str) -> bool:
    """Whether ``value`` is finite and inside ``spec`` (``> 0``, ``>= 1``, ``[0, 0.5)``...)."""
    b = _bounds(spec)
    if not math.isfinite(value):
        return False
    above = value > b.low if b.low_open else value >= b.low
    below = value < b.high if b.high_open else value <= b.high
    return above and below


def range_text(spec: str) -> str:
    """``> 0`` stays as written; an interval reads ``in [0, 0.5)``."""
    spec = spec.strip()
    if spec == "finite":
        return "a finite number"
    return spec if _COMPARE.match(spec) else f"in {spec}"


def show(value: Any) -> str:
    """A value as it would be typed after ``key=``."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return f"[{','.join(show(v) for v in value)}]"
    return str(value)


def merged(cls: type, name: str) -> dict[str, Any]:
    """Class attribute ``name`` (a dict) merged along the MRO, subclasses last."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get(name, {}))
    return out


def lookup(cfg: Any, key: str) -> Any:
    """The value of a dotted ``key`` under ``cfg`` (None when a group on the way is null)."""
    for part in key.split("."):
        if cfg is None:
            return None
        cfg = getattr(cfg, part)
    return cfg


def declared(cls: type, table: str, prefix: str = "") -> dict[str, Any]:
    """Table ``RANGES`` or ``ONLY_WITH`` of ``cls`` and of its groups, by dotted key (a
    ``Needs`` has its ``on`` made dotted too): what ``--help`` or a test can list."""
    from posttrain.config.schema import config_fields, nested_config

    out: dict[str, Any] = {}
    for name, spec in config_fields(cls).items():
        sub = nested_config(spec.type)
        if sub is not None:
            out.update(declared(sub, table, f"{prefix}{name}."))
    for key, value in merged(cls, table).items():
        if isinstance(value, Needs):
            value = Needs(prefix + value.on, value.values, value.why)
        out[prefix + key] = value
    return out


# --------------------------------------------------------------------------- the checks


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first option of ``cfg`` outside its declared range.
    ``prefix`` is the dotted path of ``cfg`` in the command's config."""
    for key, spec in merged(type(cfg), "RANGES").items():
        _check_range(lookup(cfg, key), spec, prefix + key)


def check_unused(cfg: Any, default: Any, prefix: str = "") -> None:
    """Raise UnusedOptionError for the first option of ``cfg`` given (unlike ``default``, the
    same config with every value at its default) where the other options leave it no
    effect."""
    for key, needs in merged(type(cfg), "ONLY_WITH").items():
        value = lookup(cfg, key)
        if value != lookup(default, key):
            _check_needed(cfg, key, value, needs, prefix)


def _check_range(value: Any, spec: str, key: str) -> None:
    if value is None:  # an optional option left unset
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"RANGES: {key} is not a number")  # a config-class bug
    if not in_range(value, spec):
        raise ConfigError(f"{key} must be {range_text(spec)}, got {show(value)}")


def _holds(current: Any, values: tuple[Any, ...] | str | None) -> bool:
    if values is None:
        return current not in (None, "", [], {})
    if isinstance(values, str):
        number = isinstance(current, int | float) and not isinstance(current, bool)
        return number and in_range(current, values)
    if isinstance(current, list | tuple):
        return any(v in values for v in current)
    return current in values


def _condition(on: str, current: Any, values: tuple[Any, ...] | str | None) -> str:
    if values is None:
        return f"{on} is set"
    if isinstance(values, str):
        return f"{on} {range_text(values)}"
    choices = "|".join(show(v) for v in values)
    if isinstance(current, list | tuple):
        return f"{on} includes {choices}" if len(values) == 1 else \
            f"{on} includes one of {choices}"
    return f"{on}={choices}" if len(values) == 1 else f"{on} is one of {choices}"


def _check_needed(cfg: Any, key: str, value: Any, needs: Needs, prefix: str) -> None:
    current = lookup(cfg, needs.on)
    if _holds(current, needs.values):
        return
    on = prefix + needs.on
    why = f" ({needs.why})" if needs.why else ""
    raise UnusedOptionError(
        f"{prefix}{key}={show(value)} has no effect with {on}={show(current)}: it is used "
        f"only when {_condition(on, current, needs.values)}{why}", prefix + key)


# --------------------------------------------------------------------------- helpers


def require_at_least(cfg: Any, name: str, low: float, prefix: str = "") -> None:
    value = getattr(cfg, name)
    # `not >=` (rather than `<`) also rejects NaN.
    if not (value >= low and math.isfinite(value)):
        raise ConfigError(f"{prefix}{name} must be >= {low}, got {value}")


def require_positive(cfg: Any, name: str, prefix: str = "") -> None:
    value = getattr(cfg, name)
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{prefix}{name} must be > 0, got {value}")
