"""Batched generation for evaluation, with a record of whether each response ended its turn.

Responses come from the KV-cache engine RL rollouts use (``rollout/engine.py``); greedy
decoding in fp32 (the default ``precision``) gives the same tokens as transformers'
``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from posttrain.data.chat import end_of_turn_token_id, render_prompt
from posttrain.rollout import KVCacheGenerator, SamplingParams


@dataclass
class Response:
    text: str
    ended_turn: bool  # stopped on the template's end-of-turn token, within the token budget
    num_tokens: int  # generated tokens, the stop token included


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int | None = 0,
    precision: str = "fp32",
) -> list[Response]:
    """Greedy (or sampled, with ``seed``) responses to chat prompts; the text stops before
    the stop token (end of turn or EOS)."""
    eot = end_of_turn_token_id(tokenizer)
    stop_ids = tuple(sorted({i for i in (eot, tokenizer.eos_token_id) if i is not None}))
    gen = KVCacheGenerator(model, tokenizer, stop_token_ids=stop_ids, precision=precision)
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    was_training = model.training
    model.eval()
    out: list[Response] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [render_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            ro = gen.generate(ids, 1, sampling)
            for toks, reason in zip(ro.completion_ids, ro.finish_reasons, strict=True):
                stopped = reason == "stop"
                body = toks[:-1] if stopped else toks
                out.append(Response(tokenizer.decode(body, skip_special_tokens=False),
                                    stopped and toks[-1] == eot, len(toks)))
    finally:
        model.train(was_training)
    return out
