"""``sampling.*``: how an online recipe samples its rollouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from posttrain.rollout.protocol import SamplingParams


@dataclass
class SamplingConfig:
    """Rollout sampling (the KV-cache engine's ``SamplingParams``)."""

    # Greedy (temperature 0) rollouts would make every group's completions identical.
    RANGES: ClassVar[dict[str, str]] = {
        "max_new_tokens": ">= 1", "temperature": "> 0", "top_p": "(0, 1]", "top_k": ">= 0",
    }

    max_new_tokens: int = field(default=128, metadata={"help": "completion token budget"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; 1 = off"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling; 0 = off"})
    stop: list[str] = field(default_factory=list,
                            metadata={"help": "extra stop strings (EOS/end-of-turn always stop)"})

    def params(self, seed: int | None) -> SamplingParams:
        """Training rollouts' sampling; ``seed`` makes them reproducible."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens,
                              stop_strings=tuple(self.stop), seed=seed)
