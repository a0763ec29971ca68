"""``eval.*``: held-out evaluation during an online run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from posttrain.config.checks import Needs


@dataclass
class EvalConfig:
    """Held-out evaluation (on ``eval_data``, every ``eval_steps`` and at the end)."""

    RANGES: ClassVar[dict[str, str]] = {"prompts": ">= 1", "batch_size": ">= 1"}

    prompts: int = field(default=200, metadata={"help": "max held-out prompts evaluated"})
    batch_size: int = field(default=64, metadata={"help": "prompts per generation batch"})


# For the online configs holding ``eval``: its keys are read only when there is eval_data.
EVAL_ONLY_WITH = {f"eval.{key}": Needs("eval_data", None, "held-out evaluation runs on it")
                  for key in ("prompts", "batch_size")}
