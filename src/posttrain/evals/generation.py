"""Batched generation for evaluation, with a record of whether each response ended its turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from posttrain.data.chat import end_of_turn_token_id, render_prompt


@dataclass
class Response:
    text: str
    ended_turn: bool  # stopped on the template's end-of-turn token, within the token budget
    num_tokens: int


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    temperature: float = 0.0,
) -> list[Response]:
    """Greedy (or sampled) responses to chat prompts, batched with left padding."""
    model.eval()
    eot = end_of_turn_token_id(tokenizer)
    stop_ids = {i for i in (eot, tokenizer.eos_token_id) if i is not None}
    out: list[Response] = []
    for start in range(0, len(prompts), batch_size):
        ids = [render_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        out.extend(_generate_batch(model, tokenizer, ids, max_new_tokens, temperature, eot,
                                   stop_ids))
    return out


def _generate_batch(model: Any, tokenizer: Any, ids: list[list[int]], max_new_tokens: int,
                    temperature: float, eot: int | None, stop_ids: set[int]) -> list[Response]:
    device = next(model.parameters()).device
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    gen = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_p=None, top_k=None, eos_token_id=sorted(stop_ids), pad_token_id=pad,
    )[:, width:]
    responses = []
    for row in gen.tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        body = row if end is None else row[:end]
        ended = end is not None and row[end] == eot
        responses.append(Response(tokenizer.decode(body, skip_special_tokens=False), ended,
                                  len(body) + (end is not None)))
    return responses
