"""Range checks for config ``validate()`` methods: one-line ``ConfigError`` messages."""

from __future__ import annotations

import math
from typing import Any

from posttrain.errors import ConfigError


def require_at_least(cfg: Any, name: str, low: float, prefix: str = "") -> None:
    value = getattr(cfg, name)
    # `not >=` (rather than `<`) also rejects NaN.
    if not (value >= low and math.isfinite(value)):
        raise ConfigError(f"{prefix}{name} must be >= {low}, got {value}")


def require_positive(cfg: Any, name: str, prefix: str = "") -> None:
    value = getattr(cfg, name)
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{prefix}{name} must be > 0, got {value}")

