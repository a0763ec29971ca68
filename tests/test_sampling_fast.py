"""The two-level inverse-CDF sampler (rollout/sampling.py): the distribution it draws from,
zero-probability tokens, log-probs, seeding, and the caller's logits left untouched."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.rollout import sampling
from posttrain.rollout.sampling import _BLOCK, filter_logits, sample_tokens

# chi-square quantiles at 1 - 1e-4 (scipy.stats.chi2.ppf(1 - 1e-4, df)): a correct sampler
# fails a seeded test with probability 1e-4.
_CHI2_Q = {4: 23.51, 10: 35.56}
# (temperature, top_k, top_p) cases: plain, tempered, top-k, top-p, all three
CASES = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 20, 1.0), (1.0, 0, 0.9), (1.3, 50, 0.8)]


def _heavy_logits(V: int = 1000) -> tuple[torch.Tensor, list[int]]:
    """log of a known distribution over V = 1000 (4 blocks, the last one partial): five heavy
    tokens (0.3 at 7, 0.15 at the last token, 0.1 and 0.05 either side of the block
    boundary at 255 / 256, 0.1 at 600) and 0.3 spread evenly over the other 995."""
    heavy = {7: 0.3, V - 1: 0.15, _BLOCK - 1: 0.1, _BLOCK: 0.05, 600: 0.1}
    p = torch.full((V,), 0.3 / (V - len(heavy)))
    for t, q in heavy.items():
        p[t] = q
    return p.log(), sorted(heavy)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_frequencies_match_the_filtered_softmax(temperature: float, top_p: float):
    """N = 100,000 draws (20 calls x 5,000 rows): each heavy token's frequency within
    5 standard deviations (sqrt(p (1 - p) / N) <= 1.5e-3), and a chi-square over the heavy
    tokens plus the light ones in 6 equal-count groups under its 1 - 1e-4 quantile (df = 10;
    df = 4 with top-p 0.9 at T = 0.8, whose nucleus is the five heavy tokens)."""
    logits, heavy = _heavy_logits()
    V, rows, calls = logits.numel(), 5000, 20
    p = filter_logits(logits[None], temperature, 0, top_p).softmax(-1)[0].double()
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V, dtype=torch.float64)
    for _ in range(calls):
        tok, _ = sample_tokens(logits.expand(rows, V), temperature, 0, top_p, g)
        counts += torch.bincount(tok, minlength=V)
    N = rows * calls
    freq = counts / N
    for t in heavy:
        sd = math.sqrt(float(p[t] * (1 - p[t])) / N)
        assert abs(float(freq[t] - p[t])) <= 5 * sd + 1e-12, (t, float(freq[t]), float(p[t]))
    assert float(counts[p == 0].sum()) == 0  # top-p: the light tokens may all be dropped
    light = [t for t in range(V) if t not in heavy and p[t] > 0]
    cats = [[t] for t in heavy if p[t] > 0]
    if light:
        cats += [c.tolist() for c in torch.tensor(light).chunk(6)]
    obs = torch.stack([counts[c].sum() for c in cats])
    exp = torch.stack([p[c].sum() for c in cats]) * N
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(cats) - 1
    assert chi2 < _CHI2_Q[df], (chi2, df)


def test_frequencies_on_a_model_sized_vocabulary():
    """V = 49,152 bf16 logits (192 blocks), 64 distinct rows x 100 calls: per row the top
    token's frequency over its 100 draws is not checkable, so pool it: the drawn tokens'
    mean probability under softmax matches E[p(token)] = sum p^2 within 5 standard errors."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(64, 49152, generator=g) * 3).bfloat16()
    p = logits.float().softmax(-1).double()
    want = (p * p).sum(-1)  # E[p(X)] for X ~ p, per row
    var = (p ** 3).sum(-1) - want ** 2
    got = torch.zeros(64, dtype=torch.float64)
    calls = 100
    for _ in range(calls):
        tok, _ = sample_tokens(logits, 1.0, 0, 1.0, g)
        got += p.gather(-1, tok[:, None]).squeeze(-1)
    got /= calls
    se = (var.sum() / calls).sqrt() / 64  # standard error of the mean over all rows
    assert abs(float(got.mean() - want.mean())) < 5 * float(se)


@pytest.mark.parametrize("V", [3, _BLOCK, _BLOCK + 1, 1000, 4 * _BLOCK])
def test_zero_probability_tokens_are_never_drawn(V: int):
    """-inf logits (half the vocabulary, whole blocks, all but one token: first, last, at a
    block boundary) and top-k / top-p filtered tokens, over many draws."""
    g = torch.Generator().manual_seed(V)
    R = 400
    logits = torch.randn(R, V, generator=g) * 4
    logits[: R // 4, ::2] = float("-inf")  # every other token
    if V > _BLOCK:
        logits[R // 4: R // 2, :_BLOCK] = float("-inf")  # a whole block, then a live one
        logits[R // 4: R // 2, _BLOCK + 1:] = float("-inf")
    singles = [0, V - 1, min(_BLOCK - 1, V - 1), min(_BLOCK, V - 1), V // 2]
    for i, t in enumerate(singles):  # only one token survives
        row = R // 2 + i
        logits[row] = float("-inf")
        logits[row, t] = 0.0
    for temperature, top_k, top_p in CASES + [(1.0, 1, 1.0), (1.0, 0, 1e-6)]:
        allowed = torch.isfinite(filter_logits(logits, temperature, top_k, top_p))
        for _ in range(10):
            tok, lp = sample_tokens(logits, temperature, top_k, top_p, g)
            assert allowed.gather(-1, tok[:, None]).all(), (temperature, top_k, top_p)
            assert torch.isfinite(lp).all()
            for i, t in enumerate(singles):
                assert int(tok[R // 2 + i]) == t


def test_the_extreme_uniforms_pick_the_first_and_last_live_tokens(monkeypatch):
    """u = 0 and u just under the total (where the cumulative sums and rounding meet) land
    on the first and the last positive-probability token, never on a zero around them."""
    V = 3 * _BLOCK + 10
    probs = torch.zeros(5, V)
    probs[0, [5, 700]] = torch.tensor([0.5, 0.5])
    probs[1, [_BLOCK, 2 * _BLOCK - 1]] = torch.tensor([1e-30, 1.0])  # a tiny first token
    probs[2, [0, V - 1]] = torch.tensor([1.0, 1e-3])  # a small last token, in the tail
    probs[3, 1: V - 1] = 1.0 / (V - 2)
    # Rounding puts u's place in block 1 at exactly 1 (unnormalised weights, exact sums):
    # block 0 holds lo = 27.5 ulp(3), block 1 weighs 3, so total = 3 + 28 ulp (ties to
    # even), u = 3 + 27 ulp, and u - lo and total - lo both round to 3. The within-block
    # search then runs past the block's end: the fallback keeps it on token 2 B - 1, not
    # on the zero-probability token 2 B after it.
    ulp3 = 2.0 ** -22
    probs[4, 0] = 27.5 * ulp3
    probs[4, _BLOCK: 2 * _BLOCK] = 3.0 / _BLOCK
    first = torch.tensor([5, _BLOCK, 0, 1, 0])
    last = torch.tensor([700, 2 * _BLOCK - 1, V - 1, V - 2, 2 * _BLOCK - 1])
    for u, want in ((0.0, first), (1.0, last)):
        def fake_rand(shape, *, generator, device, dtype, u=u):  # noqa: ARG001
            return torch.full(shape, u, device=device, dtype=dtype)
        monkeypatch.setattr(sampling.torch, "rand", fake_rand)
        tok = sampling._draw_blocked(probs, None)
        assert torch.equal(tok, want), (u, tok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 49152])
def test_logprobs_are_log_softmax_of_the_filtered_logits(dtype: torch.dtype, V: int):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, V, generator=g) * 3).to(dtype)
    for temperature, top_k, top_p in CASES:
        tok, lp = sample_tokens(logits, temperature, top_k, top_p, g)
        ref = torch.log_softmax(filter_logits(logits, temperature, top_k, top_p), -1)
        torch.testing.assert_close(lp, ref.gather(-1, tok[:, None]).squeeze(-1),
                                   atol=1e-5, rtol=0)
    tok, lp = sample_tokens(logits, 0.0, 0, 1.0, g)  # greedy: the untempered model's
    ref = torch.log_softmax(logits.float(), -1)
    assert torch.equal(tok, ref.argmax(-1))
    torch.testing.assert_close(lp, ref.max(-1).values, atol=1e-6, rtol=0)


def test_same_seed_same_tokens():
    logits = (torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 2)
    for temperature, top_k, top_p in CASES:
        runs = []
        for seed in (5, 5, 6):
            g = torch.Generator().manual_seed(seed)
            runs.append(torch.stack([sample_tokens(logits, temperature, top_k, top_p, g)[0]
                                     for _ in range(3)]))
        assert torch.equal(runs[0], runs[1])
        assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [4 * _BLOCK, 1000])
def test_the_callers_logits_are_not_modified(dtype: torch.dtype, V: int):
    logits = (torch.randn(8, V, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    logits[:, 3] = float("-inf")
    before = logits.clone()
    g = torch.Generator().manual_seed(0)
    for temperature, top_k, top_p in CASES + [(0.0, 0, 1.0)]:
        sample_tokens(logits, temperature, top_k, top_p, g)
        filter_logits(logits, temperature or 1.0, top_k, top_p)
        assert torch.equal(logits, before), (temperature, top_k, top_p)
    view = torch.randn(8, 2, V).to(dtype)[:, 1]  # a strided view, as from the LM head
    before = view.clone()
    sample_tokens(view, 1.0, 0, 1.0, g)
    assert torch.equal(view, before)
