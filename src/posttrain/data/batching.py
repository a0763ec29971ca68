"""Collation (padding-free packing or right padding) and deterministic batch plans.

Notation: ``B`` examples in a batch, ``T`` padded length, ``N`` total tokens of a packed row.

Shift convention: a batch carries ``labels`` already shifted for causal LM, so the logits at
position ``t`` are scored against ``labels[..., t]`` directly, with no further shifting:

    labels[t] = input_ids[t + 1]  if loss_mask[t + 1] == 1  else  -100

and ``labels`` is -100 at each sequence's last position and on padding. In a packed row
the label of a sequence's last token is therefore -100, never the next sequence's first
token. ``labels`` must not be passed to an HF model's ``forward`` (it would shift again);
use ``model_inputs(batch)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence, Sized
from typing import Any

import torch
from torch import Tensor

from posttrain.data.chat import Encoded

IGNORE_INDEX = -100

Batch = dict[str, Any]


def shifted_labels(input_ids: Sequence[int], loss_mask: Sequence[int]) -> list[int]:
    """Targets of one sequence (see the module docstring); as long as ``input_ids``."""
    pairs = zip(input_ids[1:], loss_mask[1:], strict=True)
    return [*(tok if keep else IGNORE_INDEX for tok, keep in pairs), IGNORE_INDEX]


def _check(examples: Sequence[Encoded]) -> None:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    for i, ex in enumerate(examples):
        if len(ex) == 0 or len(ex.loss_mask) != len(ex.input_ids):
            raise ValueError(f"example {i}: empty, or loss_mask and input_ids differ in length")


def _counts(examples: Sequence[Encoded]) -> dict[str, int]:
    return {
        "num_sequences": len(examples),
        "num_tokens": sum(len(ex) for ex in examples),
        # As the labels count them: position 0 is never a target, so it is left out.
        "num_target_tokens": sum(sum(ex.loss_mask[1:]) for ex in examples),
    }


def pack(examples: Sequence[Encoded]) -> Batch:
    """Concatenate examples into one row with no padding.

    Returns:
        input_ids (1, N) long: the sequences end to end.
        position_ids (1, N) long: 0, 1, ... restarting at 0 for each sequence. With no
            ``attention_mask``, transformers (sdpa/eager/flash) reads the sequence boundaries
            from these, so attention never crosses sequences. Call the model with
            ``use_cache=False``: with a cache it ignores the boundaries.
        labels (1, N) long: shifted targets, -100 at each sequence's last token.
        sequence_ids (1, N) long: which example (0..B-1) each token belongs to, for
            per-sequence sums (``index_add_``) in preference and policy-gradient losses.
        cu_seq_lens (B + 1,) long: cumulative sequence lengths [0, l1, l1+l2, ..., N], the
            varlen-attention boundaries (``posttrain.models.attention``).
        num_sequences, num_tokens, num_target_tokens: ints (labels != -100 count as targets).
    """
    _check(examples)
    ids, pos, labels, seq = [], [], [], []
    for i, ex in enumerate(examples):
        ids += ex.input_ids
        pos += range(len(ex))
        labels += shifted_labels(ex.input_ids, ex.loss_mask)
        seq += [i] * len(ex)
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)
    return {
        "input_ids": as_row(ids),
        "position_ids": as_row(pos),
        "labels": as_row(labels),
        "sequence_ids": as_row(seq),
        "cu_seq_lens": torch.tensor([0, *itertools.accumulate(map(len, examples))]),
        **_counts(examples),
    }


def pad(
    examples: Sequence[Encoded], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Batch:
    """Right-pad examples into a rectangle.

    Returns:
        input_ids (B, T) long: ``pad_token_id`` after each sequence's end.
        attention_mask (B, T) long: 1 on real tokens, 0 on padding.
        position_ids (B, T) long: 0..T-1 in every row (padding positions are never attended).
        labels (B, T) long: shifted targets, -100 at each sequence's last token and on padding.
        num_sequences, num_tokens (real tokens only), num_target_tokens: ints.
    """
    _check(examples)
    T = max(len(ex) for ex in examples)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex)
        input_ids[b, :n] = torch.tensor(ex.input_ids)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.tensor(shifted_labels(ex.input_ids, ex.loss_mask))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(T).expand(B, T).clone(),
        "labels": labels,
        **_counts(examples),
    }


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The keyword arguments for an HF causal LM's forward: no labels, no cache."""
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch} | {"use_cache": False}


# --- batch plans -------------------------------------------------------------------------


def example_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """Indices 0..n-1, permuted by a generator seeded with ``seed + epoch`` when shuffling.

    The same (n, seed, epoch) always gives the same order, on any machine, so a resumed run
    can recompute the plan and skip to its cursor.
    """
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches(
    examples: Sized | int,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> list[list[int]]:
    """Split one epoch into batches of example indices (deterministic per (seed, epoch))."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = examples if isinstance(examples, int) else len(examples)
    order = example_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    plan = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and plan and len(plan[-1]) < batch_size:
        plan.pop()
    return plan


def token_budget_batches(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """Batches of example indices whose lengths sum to at most ``max_tokens`` (for ``pack``).

    Examples are taken in epoch order (see ``example_order``) and added to the current batch
    until the next would overflow the budget; an example longer than the budget alone gets
    a batch of its own (truncate with ``max_length`` to avoid that).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    plan: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in example_order(len(lengths), shuffle=shuffle, seed=seed, epoch=epoch):
        if current and used + lengths[i] > max_tokens:
            plan.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        plan.append(current)
    return plan


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with its tensors moved to ``device`` (ints are kept as they are)."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
