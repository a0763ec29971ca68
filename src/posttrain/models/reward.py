"""Scalar-head reward models: load from a causal-LM checkpoint, score packed batches, save.

A reward model is ``AutoModelForSequenceClassification`` with one label: the causal LM's body
plus a linear ``score`` head. HF's own forward reads the reward at the *last non-pad token*,
found by searching ``input_ids`` for ``pad_token_id``; that breaks on packed rows (no
padding, several sequences per row) and on tokenizers whose pad token is also the
end-of-turn token (SmolLM2 after ``pad = eos``: the search stops early). ``sequence_rewards``
avoids both: it runs the body once over the packed row with varlen attention and applies the
head at each sequence's known last position (from ``cu_seq_lens``, or the attention mask
for padded batches).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

from posttrain.data.batching import move_batch, pack
from posttrain.data.pairs import Pair
from posttrain.errors import PosttrainError
from posttrain.models import tiny
from posttrain.models.attention import packed_kwargs
from posttrain.models.io import _not_found_message, _tiny_size

log = logging.getLogger("posttrain")


def load_reward_model(
    spec: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A one-label sequence classifier from a causal LM (new random head) or a saved RM.

    ``tiny`` / ``tiny:SIZE`` builds the tiny Llama's body from ``seed`` with a fresh head.
    """
    size = _tiny_size(spec)
    if size:
        causal = tiny.build_model(size, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForSequenceClassification(_one_label(causal.config))
        model.model.load_state_dict(causal.model.state_dict())
        return model.to(dtype)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            spec, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
        )
    except (OSError, ValueError) as e:
        raise PosttrainError(_not_found_message(spec, e)) from None
    _one_label(model.config)
    return model


def _one_label(config: Any) -> Any:
    config.num_labels = 1
    config.problem_type = "regression"
    # HF's forward needs a pad id for batch > 1; the tokenizer's pad id is set by the caller.
    if config.pad_token_id is None:
        config.pad_token_id = 0
    return config


def _head_and_body(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    head = getattr(model, "score", None)
    body = getattr(model, model.base_model_prefix, None)
    if head is None or body is None:
        raise PosttrainError(
            f"{type(model).__name__}: reward models need a body + 'score' head "
            "(Llama, Qwen, Mistral, Gemma ... sequence classifiers)"
        )
    return head, body


def last_positions(batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(row, column) of each sequence's last token, for packed or padded batches."""
    cu = batch.get("cu_seq_lens")
    if cu is not None:
        cols = cu[1:] - 1
        return torch.zeros_like(cols), cols
    lengths = batch["attention_mask"].sum(-1)  # right padding
    return torch.arange(lengths.numel(), device=lengths.device), lengths - 1


def sequence_rewards(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Scalar reward of every sequence in ``batch`` -> (B,), head applied at last tokens."""
    head, body = _head_and_body(model)
    hidden = body(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"), use_cache=False, **packed_kwargs(batch),
    ).last_hidden_state  # (B_rows, T, H)
    rows, cols = last_positions(batch)
    return head(hidden[rows, cols]).squeeze(-1).float()  # (B,)


def score_pairs(model: nn.Module, pairs: Sequence[Pair], batch_size: int = 64) -> Tensor:
    """Rewards (P, 2) of (chosen, rejected) for each pair, in order. Call
    ``enable_packed_attention(model)`` first: batches are packed rows."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        seqs = [s for p in pairs[i : i + batch_size] for s in (p.a, p.b)]
        with torch.no_grad():
            out.append(sequence_rewards(model, move_batch(pack(seqs), device)).cpu())
    return torch.cat(out).reshape(-1, 2)
