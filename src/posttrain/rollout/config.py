"""``sampling.*``: how an online recipe samples its rollouts."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.errors import ConfigError
from posttrain.rollout.protocol import SamplingParams


@dataclass
class SamplingConfig:
    """Rollout sampling (the KV-cache engine's ``SamplingParams``)."""

    max_new_tokens: int = field(default=128, metadata={"help": "completion token budget"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; 1 = off"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling; 0 = off"})
    stop: list[str] = field(default_factory=list,
                            metadata={"help": "extra stop strings (EOS/end-of-turn always stop)"})

    def validate(self) -> None:
        if not self.max_new_tokens >= 1:
            raise ConfigError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError("sampling.temperature must be > 0 for training rollouts")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")

    def params(self, seed: int | None) -> SamplingParams:
        """Training rollouts' sampling; ``seed`` makes them reproducible."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens,
                              stop_strings=tuple(self.stop), seed=seed)
