"""Token sampling: temperature, top-k and top-p filters, and the log-prob of the draw.

Shapes: ``logits`` (R, V) for R rows being decoded, V the vocabulary.

A draw is a two-level inverse CDF (``_draw_blocked``): one uniform number u per row picks a
block of ``_BLOCK`` tokens from the cumulative sums of the block masses, then a token inside
that block from the block's own cumulative sum. It is the same inverse CDF as one cumsum over
the vocabulary (with the same seed it draws the same token up to rounding), but on CPU a
cumsum is a sequential scan, where block sums are vectorised reductions: the scans left
cover V / _BLOCK block masses and one block per row. The softmax is computed in place in
the filtered fp32 copy of the logits when there is one, since on CPU a fresh (R, V) buffer
per step is often a fresh mmap that page-faults in again. (``x.sub_(max).exp_()`` instead
of the softmax is no faster, and ``exp_`` is ~8x slower on -inf inputs (top-k / top-p) and
30-80x on inputs below -87, whose results are subnormal or flush to 0; softmax's kernel is
not.)

Speed (1 thread, R = 64, V = 49,152 bf16 logits, temperature 1, shared 2-core machine;
CPU time): ~6 ms per draw against ~12.5 ms for softmax + full-vocab cumsum + search (glibc's
default allocator; 5.7 vs 9.2 ms with ``train/allocator.py``'s settings); SmolLM2-135M
rollout 348 vs 319 tok/s. An exponential race (``argmax p / E``, V exponentials per row)
costs ~190 ms and ``torch.multinomial`` ~150 ms. top-p sorts only the top 1,024 logits when
they already hold the nucleus.
"""

from __future__ import annotations

import torch
from torch import Tensor

# top-p looks for the nucleus among this many top logits first (a full sort is the fallback).
_TOP_P_CANDIDATES = 1024
# tokens per block of the two-level inverse CDF.
_BLOCK = 256


def _top_p_drop(logits: Tensor, top_p: float) -> Tensor:
    """Bool (R, V): tokens outside the smallest set whose probability reaches ``top_p``
    (a token is dropped when the tokens ranked above it already reach top_p)."""
    V = logits.shape[-1]
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    k = min(V, _TOP_P_CANDIDATES)
    values, order = torch.topk(logits, k, dim=-1)  # sorted, descending
    probs = (values - logz).exp()
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    if k < V and not bool(drop_sorted[:, -1].all()):  # some nucleus is wider than k: sort all
        values, order = torch.sort(logits, dim=-1, descending=True)
        probs = (values - logz).exp()
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop = torch.ones_like(logits, dtype=torch.bool)  # tokens outside the top k are dropped
    return drop.scatter(-1, order, drop_sorted)


def _aliases(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` share storage (``a`` is ``b``, or a view of it)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _drop(x: Tensor, drop: Tensor, logits: Tensor) -> Tensor:
    """``x`` with the ``drop`` tokens set to -inf: in place unless ``x`` is ``logits``'s."""
    if _aliases(x, logits):
        return x.masked_fill(drop, float("-inf"))
    return x.masked_fill_(drop, float("-inf"))


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Logits of the distribution to sample from: ``logits / T`` (fp32) with every token
    outside the top-k, or outside the smallest set whose probability reaches top-p, set to
    -inf. ``logits`` is never modified; the result is ``logits`` itself when it is fp32 and
    nothing applies, and otherwise a tensor of its own (filtered in place once copied)."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature if _aliases(x, logits) else x.div_(temperature)
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # (R, 1)
        x = _drop(x, x < kth, logits)
    if top_p < 1.0:
        x = _drop(x, _top_p_drop(x, top_p), logits)
    return x


def _draw_blocked(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of ``probs`` (R, V), non-negative (rows sum to ~1; any V, any
    strides): a two-level inverse CDF for u ~ U[0, total).

    The block is the first of the ``_BLOCK``-token blocks (the last one holds the remainder
    of V) whose cumulative block mass exceeds u; u's position inside that block, rescaled to
    the block's own cumulative sum, picks the token: the first whose cumulative probability
    within the block exceeds it. A zero-probability token is never drawn: a cumulative sum
    does not grow across it, and when rounding puts the position past the block's last
    cumulative value the draw falls back to the block's last nonzero token.
    """
    R, V = probs.shape
    nb, rem = divmod(V, _BLOCK)
    sums = [probs[:, :nb * _BLOCK].unflatten(-1, (nb, _BLOCK)).sum(-1)] if nb else []
    if rem:
        sums.append(probs[:, nb * _BLOCK:].sum(-1, keepdim=True))
    block_mass = torch.cat(sums, -1) if len(sums) > 1 else sums[0]  # (R, blocks): no scan
    cum = block_mass.cumsum(-1)  # a scan over V / _BLOCK values, not V
    total = cum[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device,
                   dtype=cum.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # keep u < total
    # right=True: the first block whose cumulative mass > u, so its mass is > 0.
    blk = torch.searchsorted(cum, u, right=True)  # (R, 1)
    lo = torch.where(blk > 0, cum.gather(-1, (blk - 1).clamp_min(0)), 0.0)  # mass before blk
    frac = ((u - lo) / (cum.gather(-1, blk) - lo)).clamp_(0.0, 1.0)  # u's place in the block
    cols = blk * _BLOCK + torch.arange(_BLOCK, device=probs.device)  # (R, _BLOCK)
    within = probs.gather(-1, cols.clamp_max(V - 1)).masked_fill_(cols >= V, 0.0)
    cw = within.cumsum(-1)
    pick = torch.searchsorted(cw, frac * cw[:, -1:], right=True)
    last = torch.where(within > 0, cols, -1).amax(-1, keepdim=True)  # the mass is > 0
    return torch.minimum(blk * _BLOCK + pick, last).squeeze(-1)


def sample_tokens(
    logits: Tensor, temperature: float, top_k: int, top_p: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row; returns ``tokens`` (R,) and their ``logprobs`` (R,).

    The log-prob is that of the distribution sampled from (after temperature, top-k and
    top-p): ``log_softmax(filter_logits(...))`` at the drawn token. Greedy when
    ``temperature == 0``; its log-prob is then the untempered model's (a point mass would
    carry no information). ``logits`` is never modified.
    """
    if temperature == 0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = logp.argmax(-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    x = filter_logits(logits, temperature, top_k, top_p)
    if _aliases(x, logits) or x.requires_grad or x.device.type != "cpu":
        probs = torch.softmax(x, dim=-1)
    else:  # a copy of our own: normalise in place (a fresh 12 MB buffer page-faults on CPU)
        probs = torch.softmax(x, dim=-1, out=x)
    tokens = _draw_blocked(probs, generator)
    # log of the fp32 probability equals log_softmax to ~1e-7 (a drawn token's probability
    # is never 0: the draw skips zero-probability tokens).
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()
