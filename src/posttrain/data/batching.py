"""Collation (padding-free packing or right padding), device moves, and deterministic,
resumable batch streams.

Notation: ``B`` examples in a batch, ``T`` padded length, ``N`` total tokens of a packed row.

Shift convention: a batch carries ``labels`` already shifted for causal LM, so the logits at
position ``t`` are scored against ``labels[..., t]`` directly, with no further shifting:

    labels[t] = input_ids[t + 1]  if loss_mask[t + 1] == 1  else  -100

and ``labels`` is -100 at each sequence's last position and on padding. In a packed row
the label of a sequence's last token is therefore -100, never the next sequence's first
token. ``labels`` must not be passed to an HF model's ``forward`` (it would shift again);
pass ``input_ids``, ``position_ids`` (and ``attention_mask``) instead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

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


def move_batch(batch: Batch, device: torch.device | str) -> Batch:
    """The batch on ``device``: every tensor, every object with a ``to`` (a prefix layout),
    nested batches (KTO's ``kl_batch``); ints and lists are kept as they are."""
    def move(v: Any) -> Any:
        if isinstance(v, dict):
            return move_batch(v, device)
        return v.to(device) if hasattr(v, "to") and not isinstance(v, str | bytes) else v

    return {k: move(v) for k, v in batch.items()}


# --- batch streams -------------------------------------------------------------------------


class BatchStream:
    """Endless, deterministic stream of collated micro-batches over ``examples``.

    The order of epoch ``e`` is a permutation drawn from ``seed + e``, so the stream's whole
    state is ``(epoch, pos)``: restoring it resumes exactly where an interrupted run stood.

    Under data parallelism every rank draws the same order and each step consumes
    ``world_size * batch_size`` examples, rank ``r`` taking the r-th slice; a tail too short
    to give every rank a full slice is dropped, so N ranks see exactly what one process with
    an N-times larger batch would.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        collate: Callable[[list[Any]], Batch],
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(examples) < world_size * batch_size and world_size > 1:
            raise ValueError(f"{len(examples)} examples cannot fill one global batch of "
                             f"{world_size} x {batch_size}")
        if not examples:
            raise ValueError("BatchStream needs at least one example")
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._plan(0)

    def __len__(self) -> int:
        """Micro-batches per epoch (per rank)."""
        if self.world_size > 1:
            return len(self.examples) // (self.batch_size * self.world_size)
        return math.ceil(len(self.examples) / self.batch_size)

    def _plan(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next(self) -> Batch:
        span = self.batch_size * self.world_size
        left = len(self._order) - self.pos
        if left <= 0 or (self.world_size > 1 and left < span):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._plan(self.epoch)
        chunk = self._order[self.pos : self.pos + span]
        self.pos += len(chunk)
        idx = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.collate([self.examples[i] for i in idx])

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._plan(self.epoch)
