"""``eval.*``: held-out evaluation during an online run."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.config.checks import require_at_least


@dataclass
class EvalConfig:
    """Held-out evaluation (on ``eval_data``, every ``eval_steps`` and at the end)."""

    prompts: int = field(default=200, metadata={"help": "max held-out prompts evaluated"})
    batch_size: int = field(default=64, metadata={"help": "prompts per generation batch"})

    def validate(self) -> None:
        require_at_least(self, "prompts", 1, prefix="eval.")
        require_at_least(self, "batch_size", 1, prefix="eval.")
