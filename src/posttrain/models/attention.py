"""Varlen attention for packed rows on any device (DESIGN.md §5.2).

transformers attends within packed sequences by building one (N, N) block-diagonal mask from
``position_ids``: exact, but its cost grows with the square of the whole packed row. Flash
attention's varlen kernels avoid that on GPUs; this module gives the same on CPU (and on GPUs
without flash-attn): an attention function that runs causal SDPA on each sequence's slice of
the packed row, so the cost is sum(l_i^2) instead of N^2.

``enable_packed_attention(model)`` switches a model to it. A forward that passes
``cu_seq_lens_q`` (cumulative sequence lengths, as flash-attn's varlen API names them) uses
the per-sequence path; any other forward (padded batches, generation with a KV cache) falls
through to transformers' own SDPA with its mask, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_ATTENTION = "posttrain_packed"


def _no_mask(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
    return None


def packed_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,  # noqa: ANN003
) -> tuple[Tensor, None]:
    """query (1, H, N, D), key/value (1, H_kv, N, D) -> output (1, N, H, D).

    With ``cu_seq_lens_q`` = [0, l_1, l_1 + l_2, ..., N], sequence i attends causally within
    tokens [cu_i, cu_{i+1}) only. Dropout is not supported on this path (post-training runs
    with attention dropout 0).
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        kwargs.pop("cu_seq_lens_k", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    bounds = cu.tolist()
    gqa = query.shape[1] != key.shape[1]
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    # Padded batches and generation still need transformers' causal/padding mask.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)


def enable_packed_attention(model: nn.Module) -> bool:
    """Use varlen attention if the model currently uses sdpa/eager; returns whether it did."""
    register()
    current = getattr(model.config, "_attn_implementation", None)
    if current not in ("sdpa", "eager", PACKED_ATTENTION):
        return False  # flash/flex kernels already handle packed rows natively
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


def packed_kwargs(batch: dict) -> dict:
    """The varlen kwargs for a packed batch (none for a padded one)."""
    cu = batch.get("cu_seq_lens")
    if cu is None:
        return {}
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
            "max_length_k": longest}
