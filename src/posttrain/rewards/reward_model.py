"""A trained reward model as a reward function: ``RewardModel(path).score(prompts, completions)``.

It follows the RewardFn protocol (DESIGN.md §2), so online RL can use it directly:

    rm = RewardModel("runs/rm/final")
    rm.score(["What is 2+3?"], ["2+3=5. The answer is 5."])         # -> [1.73]
    rm(prompts, completions)                                         # same, as a RewardFn

Prompts are strings or chat message lists; a string completion after a chat prompt becomes
one assistant message, so the text is rendered exactly as the model was trained on it.
Scoring is batched and padding-free (one packed forward per batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from posttrain.data.batching import pack
from posttrain.data.chat import encode_prompt_completion
from posttrain.errors import PosttrainError
from posttrain.models.attention import enable_packed_attention
from posttrain.models.device import autocast_context, pick_device
from posttrain.models.io import load_tokenizer
from posttrain.models.reward import load_reward_model, sequence_rewards

Prompt = str | list[dict[str, str]]
Completion = str | list[dict[str, str]]


class RewardModel:
    """A Bradley–Terry reward model loaded from an HF directory, ready to score."""

    def __init__(self, path: str | Path, *, batch_size: int = 32, max_length: int = 2048,
                 precision: str = "fp32", device: str | None = None, name: str = "rm"):
        self.__name__ = name  # as a RewardFn: its metrics are reward/<name>/...
        self.tokenizer = load_tokenizer(str(path))
        self.model = load_reward_model(str(path), require_head=True)
        enable_packed_attention(self.model)
        self.device = torch.device(device) if device else pick_device()
        self.model.to(self.device).eval().requires_grad_(False)
        self.batch_size, self.max_length, self.precision = batch_size, max_length, precision

    def _encode(self, prompt: Prompt, completion: Completion) -> Any:
        if isinstance(prompt, list) and isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return encode_prompt_completion(self.tokenizer, prompt, completion, self.max_length)

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> list[float]:
        """One scalar reward per (prompt, completion), in order."""
        if len(prompts) != len(completions):
            raise PosttrainError(f"score: {len(prompts)} prompts but {len(completions)} "
                                 "completions; pass one completion per prompt")
        seqs = [self._encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        out: list[float] = []
        for i in range(0, len(seqs), self.batch_size):
            batch = pack(seqs[i : i + self.batch_size])
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            with autocast_context(self.precision, self.device):
                out += sequence_rewards(self.model, batch).float().cpu().tolist()
        return out

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[Completion],
                 **columns: Any) -> list[float | None]:
        return list(self.score(prompts, completions))
