"""Token sampling: temperature, top-k and top-p filters, and the log-prob of the draw.

Shapes: ``logits`` (R, V) for R rows being decoded, V the vocabulary.

Speed (CPU, R = 64, V = 49,152; benchmarks/README.md): a draw is one uniform number per row
and a search in the row's cumulative distribution (~28 ms), where an exponential race
(``argmax p / E``, V exponentials per row) costs ~190 ms and ``torch.multinomial`` ~150 ms;
top-p sorts only the top 1,024 logits when they already hold the nucleus.
"""

from __future__ import annotations

import torch
from torch import Tensor

# top-p looks for the nucleus among this many top logits first (a full sort is the fallback).
_TOP_P_CANDIDATES = 1024


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


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Logits of the distribution to sample from: ``logits / T`` with every token outside
    the top-k, or outside the smallest set whose probability reaches top-p, set to -inf."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(_top_p_drop(logits, top_p), float("-inf"))
    return logits


def _inverse_cdf(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of ``probs`` (R, V) (rows sum to ~1): the first token whose
    cumulative probability exceeds u ~ U[0, total)."""
    cdf = probs.cumsum(-1)  # non-decreasing; zero-probability tokens add nothing
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # keep u < total
    # right=True: the first cdf > u, so a zero-probability token is never drawn.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def sample_tokens(
    logits: Tensor, temperature: float, top_k: int, top_p: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row; returns ``tokens`` (R,) and their ``logprobs`` (R,).

    Greedy when ``temperature == 0``; its log-prob is then the untempered model's (a point
    mass would carry no information).
    """
    if temperature == 0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = logp.argmax(-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    tokens = _inverse_cdf(probs, generator)
    # log of the fp32 probability equals log_softmax to ~1e-7 (a drawn token's probability
    # is never 0: the draw skips zero-probability tokens).
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()
