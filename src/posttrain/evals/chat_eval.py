"""Held-out chat evaluation: format compliance and task accuracy (the demo's report)."""

from __future__ import annotations

import re
from typing import Any

from posttrain.evals.generation import Response, generate_responses

_ROLE_LEAK = re.compile(r"<\|im_start\|>|<\|im_end\|>|\b(user|assistant|system)\n")
_INT = re.compile(r"-?\d+")


def format_ok(resp: Response) -> bool:
    """The response ended its turn with the end-of-turn token, is non-empty, and does not
    start another turn (no role markers leaking into the text)."""
    return resp.ended_turn and bool(resp.text.strip()) and not _ROLE_LEAK.search(resp.text)


def final_integer(text: str) -> str | None:
    found = _INT.findall(text)
    return found[-1] if found else None


def evaluate_chat_task(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, max_new_tokens: int = 64,
    batch_size: int = 64,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Rates over prompt-only rows with an ``answer`` column; also returns per-row samples."""
    prompts = [r["prompt"] for r in rows]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
    fmt = [format_ok(r) for r in responses]
    correct = [final_integer(r.text) == str(row["answer"]) for r, row in zip(responses, rows,
                                                                              strict=True)]
    n = max(len(rows), 1)
    metrics = {
        "format_rate": sum(fmt) / n,
        "accuracy": sum(correct) / n,
        "ended_turn_rate": sum(r.ended_turn for r in responses) / n,
        "mean_response_tokens": sum(r.num_tokens for r in responses) / n,
    }
    samples = [{"prompt": p[-1]["content"], "response": r.text, "format_ok": f, "correct": c}
               for p, r, f, c in zip(prompts, responses, fmt, correct, strict=True)]
    return metrics, samples
