"""The Generator protocol (DESIGN.md §2): what a rollout engine takes and returns.

Any engine (the built-in KV-cache sampler, a vLLM server later) implements

    generate(prompt_token_ids, n, sampling) -> Rollouts

Sample ``j`` of prompt ``i`` sits at row ``i * n + j`` of every per-completion list, so the
``n`` samples of one prompt (a GRPO group) are contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy decoding.

    ``top_k == 0`` and ``top_p == 1.0`` switch those filters off. A completion stops at the
    first token in ``stop_token_ids`` (kept as its last token) or once its decoded text
    contains one of ``stop_strings`` (the token that completed it is kept; nothing after),
    else after ``max_new_tokens`` tokens (finish reason ``length``). ``seed`` makes sampling
    reproducible: the same model, prompts and params give the same tokens.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("top_k must be >= 0 and max_new_tokens >= 1")


@dataclass
class Rollouts:
    """The output of one ``generate`` call.

    ``completion_ids[k]``, ``logprobs[k]`` and ``finish_reasons[k]`` describe completion
    ``k = i * n + j`` (sample ``j`` of prompt ``i``). ``logprobs[k][t]`` is the log-probability
    of token ``t`` under the distribution it was actually drawn from (after temperature,
    top-k and top-p; for greedy decoding, the untempered model distribution). A stop token,
    when one ended the completion, is its last token and has a log-prob like any other.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[FinishReason]
    n: int
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def prompt_of(self, k: int) -> int:
        return k // self.n


@runtime_checkable
class Generator(Protocol):
    """A rollout engine. Engines that hold their own copy of the weights (vLLM) also expose
    ``update_weights(model)``; the built-in engine samples from the training model itself."""

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams
    ) -> Rollouts: ...
