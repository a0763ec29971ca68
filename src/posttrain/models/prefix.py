"""Prefix-shared packed forwards (DESIGN.md §5.1): a prompt shared by several sequences goes
through the model once.

A *group* is one prompt and the sequences that continue it: a GRPO prompt and its G sampled
completions, or a DPO pair's chosen and rejected responses. The group is packed as one
segment ``[prompt, suffix_1, ..., suffix_G]``:

    position ids    0..P-1 | P..P+L_1-1 | P..P+L_2-1 | ...
    prompt tokens   attend causally among themselves
    suffix_j tokens attend to the prompt's keys/values, then causally to suffix_j's own

This is exact (each suffix token sees the same keys at the same positions as in its own
forward) and saves (G-1) * P tokens of every projection and MLP. The attention is a custom
attention function (``prefix_attention_forward``) with two layouts:

- ``PrefixLayout`` (masked): two batched SDPA calls per layer, one for all prompts and one
  for all suffixes, each suffix's keys being its prompt's keys concatenated with its own,
  padded, with a boolean mask. Prompt scores are computed once (GRPO's training forward).
- ``PrefixGather`` (gather): the q/k/v of each sequence ``[prompt, suffix_j]`` are gathered
  from the shared row and run through the causal varlen path of ``models/attention.py``;
  only the prompt's attention scores repeat per suffix. On CPU this is the faster one for
  DPO pairs (the SDPA kernel skips causal blocks, not masked ones), the default of
  ``pack_groups``.

A forward without a ``prefix_layout`` kwarg falls through to the varlen path, so one model
serves every kind of batch. ``pack_groups`` builds a row from tokenised ``Encoded`` sequences
(loss masks kept): the shared prompt of a group is its longest common token prefix that
holds no target token, so targets are never shared and every sequence keeps its own
log-prob. Notation: ``Ng`` groups, ``Nc`` suffixes, ``N`` packed tokens, ``Nu`` tokens
without sharing, ``M`` target tokens, ``P``/``L`` padded prompt and suffix lengths, ``H``
heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from posttrain.data.chat import Encoded
from posttrain.models.attention import packed_attention_forward

PREFIX_ATTENTION = "posttrain_prefix"


@dataclass
class PrefixLayout:
    """Index tensors of a prefix-shared packed row (built once per micro-batch)."""

    prompt_idx: Tensor  # (Ng, P) row position of each prompt token (padding -> 0)
    prompt_mask: Tensor  # (Ng, 1, P, P) bool: causal, real keys only
    comp_idx: Tensor  # (Nc, L) row position of each suffix token (padding -> 0)
    kv_idx: Tensor  # (Nc, P + L) row positions of each suffix's keys: prompt, then own
    comp_mask: Tensor  # (Nc, 1, L, P + L) bool
    inverse: Tensor  # (N,) where each row position sits in cat(prompt outputs, comp outputs)

    def to(self, device: torch.device | str) -> PrefixLayout:
        return PrefixLayout(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@dataclass
class PrefixGather:
    """A prefix-shared row whose attention runs per sequence on gathered keys: sequence j is
    ``[prompt_g, suffix_j]``, its q/k/v gathered from the shared row (the prompt's
    projections are computed once), then causal varlen attention as in a plain packed row.
    Only the prompt's attention scores are repeated per suffix; every projection and MLP
    runs once per shared token."""

    unshared_idx: Tensor  # (Nu,) row position of each token of the unshared layout
    cu_seq_lens: Tensor  # (Nc + 1,) sequence bounds in the unshared layout
    pick: Tensor  # (N,) unshared position whose attention output each row position takes

    def to(self, device: torch.device | str) -> PrefixGather:
        return PrefixGather(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


@torch.compiler.disable  # eager inside a compiled layer, as packed_attention_forward
def prefix_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
    attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """query (1, H, N, D), key/value (1, H_kv, N, D) -> (1, N, H, D). Any forward without a
    ``prefix_layout`` kwarg goes to the varlen/SDPA path unchanged."""
    lay: PrefixLayout | PrefixGather | None = kwargs.pop("prefix_layout", None)
    if lay is None:
        return packed_attention_forward(module, query, key, value, attention_mask,
                                        dropout=dropout, scaling=scaling, **kwargs)
    if isinstance(lay, PrefixGather):
        idx, cu = lay.unshared_idx, lay.cu_seq_lens
        out, _ = packed_attention_forward(  # (1, Nu, H, D)
            module, query[:, :, idx], key[:, :, idx], value[:, :, idx], None, dropout=dropout,
            scaling=scaling, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        return out[:, lay.pick], None
    q, k, v = query[0], key[0], value[0]  # (H, N, D), (H_kv, N, D)
    gqa = q.shape[0] != k.shape[0]
    sdpa = lambda qq, kk, vv, m: F.scaled_dot_product_attention(  # noqa: E731
        qq, kk, vv, attn_mask=m, scale=scaling, enable_gqa=gqa)
    bhld = lambda x, idx: x[:, idx].transpose(0, 1)  # (H, N, D) -> (B, H, len, D)  # noqa: E731
    out_p = sdpa(bhld(q, lay.prompt_idx), bhld(k, lay.prompt_idx), bhld(v, lay.prompt_idx),
                 lay.prompt_mask)  # (Ng, H, P, D)
    out_c = sdpa(bhld(q, lay.comp_idx), bhld(k, lay.kv_idx), bhld(v, lay.kv_idx),
                 lay.comp_mask)  # (Nc, H, L, D)
    real_p = lay.prompt_mask[:, 0].diagonal(dim1=-2, dim2=-1)  # (Ng, P) a real token sees itself
    real_c = lay.comp_mask[:, 0, :, lay.prompt_idx.shape[1]:].diagonal(dim1=-2, dim2=-1)
    flat = torch.cat([out_p.transpose(1, 2)[real_p], out_c.transpose(1, 2)[real_c]])  # (N, H, D)
    return flat[lay.inverse].unsqueeze(0), None


def enable_prefix_attention(model: nn.Module) -> bool:
    """Switch an sdpa/eager/varlen model to the prefix-sharing attention (a superset of the
    varlen one). Returns False (and changes nothing) for flash/flex implementations."""
    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX_ATTENTION, sdpa_mask)
    current = getattr(model.config, "_attn_implementation", None)
    if current not in ("sdpa", "eager", "posttrain_packed", PREFIX_ATTENTION):
        return False
    model.set_attn_implementation(PREFIX_ATTENTION)
    return True


def pad_rows(rows: Sequence[Sequence[int]], value: int = 0) -> Tensor:
    """Right-pad integer lists into a (len(rows), longest) long tensor."""
    width = max(map(len, rows))
    return torch.tensor([[*r, *[value] * (width - len(r))] for r in rows], dtype=torch.long)


def build_layout(prompt_rows: list[list[int]], comp_rows: list[list[int]],
                 comp_group: list[int], n: int) -> PrefixLayout:
    """The layout of a packed row of ``n`` tokens: ``prompt_rows[g]`` / ``comp_rows[j]`` are
    the row positions of group g's prompt / suffix j's tokens, ``comp_group[j]`` its group.
    Every prompt must have at least one token; a suffix may be empty."""
    p_len = torch.tensor(list(map(len, prompt_rows)))
    c_len = torch.tensor(list(map(len, comp_rows)))
    P, L = int(p_len.max()), max(int(c_len.max()), 1)
    p_real = torch.arange(P)[None] < p_len[:, None]  # (Ng, P)
    c_real = torch.arange(L)[None] < c_len[:, None]  # (Nc, L)
    causal_p = torch.ones(P, P, dtype=torch.bool).tril()
    causal_c = torch.ones(L, L, dtype=torch.bool).tril()
    prompt_idx = pad_rows(prompt_rows)
    comp_idx = pad_rows([r or [0] for r in comp_rows])[:, :L]
    grp = torch.tensor(comp_group)
    # Padded query rows still see at least one real key (the prompt's), so SDPA never NaNs.
    prompt_mask = causal_p[None] & p_real[:, None, :]
    comp_keys = torch.cat([p_real[grp][:, None, :].expand(-1, L, -1),
                           causal_c[None] & c_real[:, None, :]], dim=-1)  # (Nc, L, P + L)
    order = torch.cat([prompt_idx[p_real], comp_idx[c_real]])
    inverse = torch.empty(n, dtype=torch.long)
    inverse[order] = torch.arange(n)
    return PrefixLayout(prompt_idx, prompt_mask[:, None], comp_idx,
                        torch.cat([prompt_idx[grp], comp_idx], dim=1), comp_keys[:, None],
                        inverse)


# ---- groups of tokenised sequences ------------------------------------------------------


def _head(s: Encoded) -> int:
    """Tokens before the first target (at least 1: nothing predicts a sequence's first)."""
    first = next((t for t, m in enumerate(s.loss_mask) if m), len(s))
    return max(1, first)


def shared_prefix_len(seqs: Sequence[Encoded]) -> int:
    """Length of the longest common token prefix of ``seqs`` that holds no target token of
    any of them (0 when the first tokens differ)."""
    limit = min(_head(s) for s in seqs)
    first = seqs[0].input_ids
    for t in range(limit):
        if any(s.input_ids[t] != first[t] for s in seqs[1:]):
            return t
    return limit


def pack_groups(groups: Sequence[Sequence[Encoded]],
                attention: Literal["gather", "masked"] = "gather") -> dict[str, Any]:
    """Pack groups of sequences into one prefix-shared row (no padding).

    Each group's sequences share their :func:`shared_prefix_len` prompt; a group whose
    sequences share no prefix is packed as singletons (each its own prompt + suffix), which
    is exactly the plain packed forward. Sequences are numbered in input order.

    ``attention`` picks the layout: ``gather`` (:class:`PrefixGather`: per-sequence causal
    attention on gathered q/k/v; the prompt's attention scores are recomputed per suffix,
    its projections and MLP are not) or ``masked`` (:class:`PrefixLayout`: prompt scores once,
    padded masked SDPA). Both are exact; ``gather`` is the faster one on CPU (bf16 autocast,
    DPO pairs: the CPU SDPA kernel skips causal blocks but not masked ones).

    Returns ``input_ids``/``position_ids`` (1, N); ``prefix_layout``; ``pred_pos`` (M,) the row
    position whose logits predict each target token; ``targets`` (M,) the target ids;
    ``target_seq`` (M,) the sequence each target belongs to; ``num_sequences``,
    ``num_tokens`` (N, after sharing), ``num_target_tokens``, ``num_unshared_tokens`` (what
    ``pack`` would have computed).
    """
    ids: list[int] = []
    pos: list[int] = []
    prompt_rows: list[list[int]] = []
    comp_rows: list[list[int]] = []
    comp_group: list[int] = []
    pred: list[int] = []
    tgt: list[int] = []
    tseq: list[int] = []
    for seqs in groups:
        P = shared_prefix_len(seqs)
        parts = [(P, seqs)] if P > 0 else [(_head(s), [s]) for s in seqs]
        for P, members in parts:
            start = len(ids)
            prompt_rows.append(list(range(start, start + P)))
            ids += members[0].input_ids[:P]
            pos += range(P)
            for s in members:
                j = len(comp_rows)
                s0 = len(ids)
                comp_rows.append(list(range(s0, s0 + len(s) - P)))
                comp_group.append(len(prompt_rows) - 1)
                ids += s.input_ids[P:]
                pos += range(P, len(s))
                for t in range(P, len(s)):
                    if s.loss_mask[t]:  # token t is predicted by the token before it
                        pred.append(start + P - 1 if t == P else s0 + t - P - 1)
                        tgt.append(s.input_ids[t])
                        tseq.append(j)
    if attention == "gather":
        layout: PrefixLayout | PrefixGather = _gather(prompt_rows, comp_rows, comp_group,
                                                      len(ids))
    elif attention == "masked":
        layout = build_layout(prompt_rows, comp_rows, comp_group, len(ids))
    else:
        raise ValueError(f"attention must be 'gather' or 'masked', got {attention!r}")
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return {
        "input_ids": as_long(ids)[None], "position_ids": as_long(pos)[None],
        "prefix_layout": layout,
        "pred_pos": as_long(pred), "targets": as_long(tgt), "target_seq": as_long(tseq),
        "num_sequences": len(comp_rows), "num_tokens": len(ids),
        "num_target_tokens": len(tgt),
        "num_unshared_tokens": sum(len(prompt_rows[g]) + len(c)
                                   for c, g in zip(comp_rows, comp_group, strict=True)),
    }


def _gather(prompt_rows: list[list[int]], comp_rows: list[list[int]], comp_group: list[int],
            n: int) -> PrefixGather:
    """Sequence j of the unshared layout is ``prompt_rows[comp_group[j]] + comp_rows[j]``; a
    prompt token's output is taken from its first sequence (all copies are equal)."""
    idx: list[int] = []
    cu = [0]
    pick = [-1] * n
    for c, g in zip(comp_rows, comp_group, strict=True):
        for k, r in enumerate(prompt_rows[g] + c):
            if pick[r] < 0:
                pick[r] = len(idx) + k
        idx += prompt_rows[g] + c
        cu.append(len(idx))
    return PrefixGather(torch.tensor(idx), torch.tensor(cu), torch.tensor(pick))


def pack_pairs(seqs: Sequence[Encoded],
               attention: Literal["gather", "masked"] = "gather") -> dict[str, Any]:
    """``pack_groups`` over consecutive pairs ``[a_1, b_1, a_2, b_2, ...]`` (DPO's
    chosen/rejected interleaving); sequence order is kept."""
    if len(seqs) % 2:
        raise ValueError(f"pack_pairs needs an even number of sequences, got {len(seqs)}")
    return pack_groups([seqs[i : i + 2] for i in range(0, len(seqs), 2)], attention)


def prefix_forward_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    """Model kwargs for a prefix-shared row. A 4D mask makes transformers skip building an
    (N, N) mask; our attention ignores it and reads ``prefix_layout`` instead."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "use_cache": False, "prefix_layout": batch["prefix_layout"],
            "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool,
                                         device=batch["input_ids"].device)}
