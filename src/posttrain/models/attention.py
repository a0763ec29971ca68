"""Varlen attention for packed rows on any device (DESIGN.md §5.2).

transformers attends within packed sequences by building one (N, N) block-diagonal mask from
``position_ids``: exact, but its cost grows with the square of the whole packed row. Flash
attention's varlen kernels avoid that on GPUs; this module gives the same on CPU (and on GPUs
without flash-attn): an attention function that runs causal SDPA on each sequence's slice of
the packed row, so the cost is sum(l_i^2) instead of N^2.

``enable_packed_attention(model)`` switches a model to it. A forward that passes
``cu_seq_lens_q`` (cumulative sequence lengths, as flash-attn's varlen API names them) uses
the per-sequence path, and transformers builds no (N, N) mask for it (the mask function sees
a varlen forward through a context variable set by a forward pre-hook); any other forward
(padded batches, generation with a KV cache) falls through to transformers' own SDPA with its
mask, unchanged.

On CPU every path of this attention computes in fp32, even under bf16 autocast (the matmuls
around it stay bf16): the CPU flash kernel is ~25-35% faster in fp32 than in bf16 at head
dim 64, and fp32 is the more precise choice. The packed row is cut with ``split`` (its
backward is one concatenation) rather than slicing (whose backward zero-fills a full-row
gradient per sequence).

Under bf16 autocast, sequences of up to ``MATMUL_ATTENTION_MAX_LEN`` tokens take
``CausalMatmulAttention`` instead of the fp32 flash kernel: GPU flash attention's precision
split (scores and their gradient in fp32, probabilities and score gradients in bf16) with the
l x l products as batched GEMMs, which run near the machine's matmul peak where the CPU flash
kernel reaches ~50 GFLOP/s. Timings: benchmarks/README.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_ATTENTION = "posttrain_packed"

# True while a forward with ``cu_seq_lens_q`` runs: its attention never reads a mask.
_VARLEN_FORWARD: ContextVar[bool] = ContextVar("posttrain_varlen_forward", default=False)


def packed_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """transformers' SDPA mask, except inside a varlen forward, where no mask is needed (for
    packed position ids transformers would otherwise build the full (N, N) block-diagonal
    mask that the varlen path ignores)."""
    if _VARLEN_FORWARD.get():
        return None
    return sdpa_mask(*args, **kwargs)


# The matmul path keeps each sequence's (H, l, l) bf16 probabilities for the backward:
# 4.7 MB per layer at l = 512 for SmolLM2's 9 heads; longer sequences take the flash kernel.
MATMUL_ATTENTION_MAX_LEN = 512

_FUTURE = torch.ones(0, 0, dtype=torch.bool)


def _future_mask(length: int) -> Tensor:
    """(l, l) bool, True above the diagonal (keys a query must not see); one cached copy."""
    global _FUTURE
    if _FUTURE.shape[0] < length:
        _FUTURE = torch.ones(length, length, dtype=torch.bool).triu_(1)
    return _FUTURE[:length, :length]


# Looked up once: the context below is entered twice per sequence and layer of every step.
_ONEDNN_MATMUL = (getattr(torch.backends.mkldnn, "matmul", None)
                  if torch.backends.mkldnn.is_available() else None)


@contextmanager
def onednn_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls inside go to oneDNN instead of MKL.

    On AMD CPUs the CPU wheel's MKL sgemm runs ~150 GFLOP/s on 2 cores where oneDNN reaches
    ~400; torch routes fp32 matmuls to oneDNN only when its fp32 precision setting allows bf16
    math. On CPUs without AMX oneDNN still computes in fp32 (the same error against fp64 as
    MKL); with AMX the inputs may be rounded to bf16 with fp32 accumulation, which is GPU
    flash attention's precision for the two products used here.
    The setting is process-wide, so it is restored on exit."""
    if _ONEDNN_MATMUL is None:
        yield
        return
    previous = _ONEDNN_MATMUL.fp32_precision
    _ONEDNN_MATMUL.fp32_precision = "bf16"
    try:
        yield
    finally:
        _ONEDNN_MATMUL.fp32_precision = previous


class CausalMatmulAttention(torch.autograd.Function):
    """Causal attention of one sequence with explicit l x l scores, for CPU mixed precision.

    q (1, H, l, D), k (1, H_kv, l, D) (any float dtype; fp32 after RoPE under autocast),
    v (1, H_kv, l, D) in the low dtype ``v.dtype`` -> (1, l, H, D) in ``v.dtype``.
    Head h reads K/V head h // g, g = H / H_kv: the g query heads of a K/V head are stacked
    as the rows of one (g l, D) matrix, so each product is one batched GEMM over the H_kv
    heads (no broadcast copies of K/V; the sums over a group fall out of dK and dV's GEMMs).
    With S = scale q k^T (fp32), P = softmax(S + causal mask) (stored in the low dtype),
    O = P v:

        dV = P^T dO,   dP = dO v^T (fp32),   dS = P * (dP - rowsum(dO * O)),
        dQ = scale dS k,   dK = scale dS^T q,

    the products with P and dS in the low dtype (fp32 accumulation), as flash attention does
    on GPUs; the two fp32 products run on oneDNN (``onednn_fp32_matmul``). Autocast is off
    inside: the dtypes above are this function's choice.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        _, heads, length, dim = q.shape
        kv_heads, low = k.shape[1], v.dtype
        with torch.autocast("cpu", enabled=False), onednn_fp32_matmul():
            q3 = q[0].reshape(kv_heads, heads // kv_heads * length, dim)  # (H_kv, g l, D)
            # scale on k: a third of q's size, and a power of two for D = 64 (exact)
            scores = torch.bmm(q3.float(), (k[0].float() * scale).transpose(1, 2))
            scores.view(kv_heads, -1, length, length).masked_fill_(
                _future_mask(length), float("-inf"))  # (H_kv, g l, l)
            probs = torch.softmax(scores, -1).to(low)
            del scores
            out = torch.bmm(probs, v[0])  # (H_kv, g l, D)
        ctx.scale = scale
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.save_for_backward(q3.to(low), k[0].to(low), v, probs, out)
        return out.view(heads, length, dim).transpose(0, 1).unsqueeze(0)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q3, k, v, probs, out = ctx.saved_tensors
        kv_heads, rows, length = probs.shape
        low = v.dtype
        with torch.autocast("cpu", enabled=False), onednn_fp32_matmul():
            d_out = grad_out[0].transpose(0, 1).reshape(kv_heads, rows, -1).to(low)
            d_v = torch.bmm(probs.transpose(1, 2), d_out)  # (H_kv, l, D)
            d_out32 = d_out.float()
            d_p = torch.bmm(d_out32, v[0].float().transpose(1, 2))  # (H_kv, g l, l)
            delta = (d_out32 * out.float()).sum(-1, keepdim=True)  # (H_kv, g l, 1)
            d_s = d_p.sub_(delta).mul_(probs).to(low)
            del d_p
            d_q = torch.bmm(d_s, k).mul_(ctx.scale)  # (H_kv, g l, D)
            d_k = torch.bmm(d_s.transpose(1, 2), q3).mul_(ctx.scale)  # (H_kv, l, D)
        q_dtype, k_dtype = ctx.dtypes
        return (d_q.view(-1, length, d_q.shape[-1]).unsqueeze(0).to(q_dtype),
                d_k.unsqueeze(0).to(k_dtype), d_v.unsqueeze(0).to(v.dtype), None)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, scaling: float | None) -> Tensor:
    """One sequence (1, H, l, D), (1, H_kv, l, D) x2 -> (1, l, H, D)."""
    length = q.shape[2]
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if (training and q.device.type == "cpu" and v.dtype == torch.bfloat16
            and 1 < length <= MATMUL_ATTENTION_MAX_LEN):
        return CausalMatmulAttention.apply(q, k, v, scaling or q.shape[-1] ** -0.5)
    if q.device.type == "cpu":  # fp32 flash kernel (see the module doc)
        q, k, v = q.float(), k.float(), v.float()
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)  # (1, l, H, D); the caller's cat makes it contiguous


def _varlen_sdpa(query: Tensor, key: Tensor, value: Tensor, lengths: list[int],
                 scaling: float | None) -> Tensor:
    """(1, H, N, D), (1, H_kv, N, D) x2 -> (1, N, H, D): causal attention per sequence."""
    outs = [
        _causal_attention(q, k, v, scaling)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2),
                           value.split(lengths, 2), strict=True)
    ]
    out = torch.cat(outs, dim=1)  # promotes a mix of bf16 (matmul) and fp32 (flash) pieces
    return out.to(query.dtype) if query.device.type == "cpu" else out


def _cpu_decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                          scaling: float | None) -> Tensor:
    """One decoding step: query (B, H, 1, D), key/value (B, H_kv, K, D), mask None or
    broadcastable to (B, 1, 1, K) (bool: True = attend, or additive) -> (B, 1, H, D), fp32.

    Two batched matmuls and a softmax, with each K/V head's g = H / H_kv query heads stacked
    as the rows of one product: SmolLM2-135M shapes (B=64, H=9, H_kv=3, K=100, D=64) take
    0.9 ms vs 1.8 ms for SDPA's CPU kernel over a 132-slot cache (the query attends to at
    least its own key, so no row is fully masked)."""
    B, H, _, D = query.shape
    kv = key.shape[1]
    with torch.autocast("cpu", enabled=False):
        q = query.float().view(B, kv, H // kv, D)  # head h reads K/V head h // g
        k, v = key.float(), value.float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling or D**-0.5)  # (B, H_kv, g, K)
        if mask is not None:
            scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                      else scores + mask)
        out = torch.matmul(scores.softmax(-1), v)  # (B, H_kv, g, D)
    return out.view(B, 1, H, D).to(query.dtype)


# Eager even inside a compiled layer (models/compile.py): the loop depends on the lengths.
@torch.compiler.disable
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
    with attention dropout 0). On CPU the attention (this path and the fallback) is computed
    in fp32 (see the module doc) and returned in the query's dtype.
    """
    cu = kwargs.get("cu_seq_lens_q")
    on_cpu = query.device.type == "cpu"
    if cu is None or query.shape[0] != 1:
        kwargs.pop("cu_seq_lens_k", None)
        if not on_cpu:
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling, **kwargs)
        if query.shape[2] == 1 and dropout == 0.0:
            return _cpu_decode_attention(query, key, value, attention_mask, scaling), None
        with torch.autocast("cpu", enabled=False):  # fp32: see the module doc
            out, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                            attention_mask, dropout=dropout, scaling=scaling,
                                            **kwargs)
        return out.to(query.dtype), None
    lengths = (cu[1:] - cu[:-1]).tolist()
    with torch.autocast("cpu", enabled=False):  # our dtype choice, not autocast's bf16
        return _varlen_sdpa(query, key, value, lengths, scaling), None


def _enter_varlen(module: nn.Module, args: tuple, kwargs: dict) -> None:
    token = _VARLEN_FORWARD.set(kwargs.get("cu_seq_lens_q") is not None)
    module.__dict__.setdefault("_posttrain_varlen_tokens", []).append(token)


def _exit_varlen(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    tokens = module.__dict__.get("_posttrain_varlen_tokens")
    if tokens:
        _VARLEN_FORWARD.reset(tokens.pop())


def _track_varlen_forwards(model: nn.Module) -> None:
    """Mark varlen forwards of ``model``'s decoder (where transformers builds the mask; the
    causal-LM wrapper passes its kwargs through, and some callers call the decoder itself)."""
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    decoder = decoder if isinstance(decoder, nn.Module) else model
    if getattr(decoder, "_posttrain_varlen_hooked", False):
        return
    decoder.register_forward_pre_hook(_enter_varlen, with_kwargs=True)
    decoder.register_forward_hook(_exit_varlen, with_kwargs=True, always_call=True)
    decoder._posttrain_varlen_hooked = True


def register() -> None:
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    # Padded batches and generation still need transformers' causal/padding mask.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, packed_mask)


def enable_packed_attention(model: nn.Module) -> bool:
    """Use varlen attention if the model currently uses sdpa/eager; returns whether it did."""
    register()
    current = getattr(model.config, "_attn_implementation", None)
    if current not in ("sdpa", "eager", PACKED_ATTENTION):
        return False  # flash/flex kernels already handle packed rows natively
    model.set_attn_implementation(PACKED_ATTENTION)
    _track_varlen_forwards(model)
    return True


def packed_kwargs(batch: dict) -> dict:
    """The varlen kwargs for a packed batch (none for a padded one)."""
    cu = batch.get("cu_seq_lens")
    if cu is None:
        return {}
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
            "max_length_k": longest}
