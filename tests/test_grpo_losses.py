"""GRPO-family losses against hand-derived numbers (seed EQ 5.6, DAPO, Dr. GRPO, GSPO)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.advantages import (
    compute_advantages,
    group_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_spread_groups,
)
from posttrain.losses.kl import kl_estimate
from posttrain.losses.policy_gradient import aggregation_count, grpo_loss

ATOL = 1e-6


def test_eq56_worked_example_correct_answer_gets_advantage_one():
    # mean(1,0,1,0) = 0.5; population std = 0.5; (1 - 0.5) / 0.5 = 1.
    A = group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(A, torch.tensor([[1.0, -1.0, 1.0, -1.0]]), atol=ATOL, rtol=0)


def test_scale_rewards_batch_and_none():
    r = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    # none: r - group mean
    torch.testing.assert_close(group_advantages(r, "none"), torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    # batch: divide by the std of all four rewards: mean 1.75, var = (0.5625+3.0625+1.5625*2)/4
    std = math.sqrt((0.75**2 + 1.75**2 + 1.25**2 + 1.25**2) / 4)
    torch.testing.assert_close(group_advantages(r, "batch"),
                               torch.tensor([[0.5 / std, -0.5 / std], [0.0, 0.0]]))


def test_zero_spread_groups_get_zero_advantage_not_nan():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for est in ("grpo", "rloo"):
        A = compute_advantages(r, est)
        assert torch.isfinite(A).all()
        assert (A[:2] == 0).all()
    assert zero_spread_groups(r).tolist() == [True, True, False]


def test_near_ties_follow_the_same_rule_as_skipping():
    """Rewards 0.5 and 0.5 + 1e-7 are a tie: the group is flagged zero-spread (so GRPO skips
    it) and its advantages are exactly 0 (so skipping it is exact), for every group-baseline
    estimator and scale; a spread just above the 1e-6 tolerance is signal (advantage +-1)."""
    tie = torch.tensor([[0.5, 0.5 + 1e-7, 0.5, 0.5 + 1e-7]])
    assert zero_spread_groups(tie).tolist() == [True]
    for est, scale in (("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("rloo", "group")):
        assert (compute_advantages(tie, est, scale) == 0).all(), (est, scale)
    apart = torch.tensor([[0.5, 0.5 + 2e-6, 0.5, 0.5 + 2e-6]], dtype=torch.float64)
    assert zero_spread_groups(apart).tolist() == [False]
    torch.testing.assert_close(group_advantages(apart), torch.tensor([[-1.0, 1.0, -1.0, 1.0]],
                               dtype=torch.float64))


def test_rloo_leave_one_out_baseline():
    # sample 0: 1 - mean(0,0,0) = 1; others: 0 - mean(1,0,0) = -1/3
    A = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(A, torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3]]))


def test_reinforce_pp_whitens_over_the_batch():
    A = reinforce_pp_advantages(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    # batch mean 0.5, std 0.5: groups with zero spread still get signal (no group baseline)
    torch.testing.assert_close(A, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))


def test_overlong_penalty_dapo():
    # max 10, buffer 4: soft region starts after 6 tokens
    L = torch.tensor([5, 6, 8, 10, 11])
    torch.testing.assert_close(overlong_penalty(L, 10, 4),
                               torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert (overlong_penalty(L, 10, 0) == 0).all()


def _one_token(ratio: float, adv: float, **kw):
    old = torch.tensor([[0.0]])
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, m = grpo_loss(logp, old, torch.tensor([adv]), torch.tensor([[True]]), 1.0, **kw)
    loss.backward()
    return float(loss.detach()), float(logp.grad), m


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "grad", "low", "high"),
    [
        # A > 0: the ratio is capped at 1 + eps_high = 1.28; below 1 - eps_low nothing clips
        (1.5, 1.0, -1.28, 0.0, 0, 1),
        (1.25, 1.0, -1.25, -1.25, 0, 0),  # inside clip-higher (a symmetric 0.2 would clip)
        (0.5, 1.0, -0.5, -0.5, 0, 0),
        # A < 0: capped below at 1 - eps_low = 0.8; above, the pessimistic unclipped term wins
        (0.5, -1.0, 0.8, 0.0, 1, 0),
        (1.5, -1.0, 1.5, 1.5, 0, 0),
    ],
)
def test_clip_edge_cases_asymmetric(ratio, adv, loss, grad, low, high):
    # l = -min(r A, clip(r, 0.8, 1.28) A); d l / d logp = -r A where unclipped, else 0
    got_loss, got_grad, m = _one_token(ratio, adv, eps_low=0.2, eps_high=0.28)
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert got_grad == pytest.approx(grad, abs=1e-6)
    assert float(m["grpo/clip_frac_low"]) == low
    assert float(m["grpo/clip_frac_high"]) == high


def test_first_ratio_is_one_and_gradient_is_reinforce():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, m = grpo_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2, dtype=bool), 1.0)
    loss.backward()
    # grpo aggregation: -(1/2) sum_t r_t A; d/dlogp_t = -A/2 = -1
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0]]))
    assert float(m["grpo/ratio_mean"]) == 1.0


def test_gspo_sequence_ratio_is_length_normalised():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.1, 0.3]], requires_grad=True)
    loss, _ = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=bool), 1.0,
                        importance_sampling="sequence", eps_low=1.0, eps_high=1.0)
    s = math.exp((0.1 + 0.3) / 2)  # exp(mean_t log ratio) = 1.2214
    assert float(loss.detach()) == pytest.approx(-s, abs=1e-6)
    loss.backward()
    # d(-s)/d logp_t = -s / |o|
    torch.testing.assert_close(logp.grad, torch.tensor([[-s / 2, -s / 2]]))


def test_gspo_sequence_clip():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, 0.5]])  # s = e^0.5 = 1.65 > 1.2
    loss, m = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=bool), 1.0,
                        importance_sampling="sequence")
    assert float(loss) == pytest.approx(-1.2)
    assert float(m["grpo/clip_frac_high"]) == 1.0


def _two_seqs():
    # seq 0: 1 token, A = -1 -> per-token loss 1; seq 1: 3 tokens, A = -2 -> per-token loss 2
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    return logp, mask, torch.tensor([-1.0, -2.0])


@pytest.mark.parametrize(
    ("agg", "expected"),
    [("grpo", (1 + 2) / 2),  # mean over each sequence, then over 2 sequences
     ("dapo", (1 + 3 * 2) / 4),  # one mean over the 4 tokens
     ("dr_grpo", (1 + 3 * 2) / (2 * 4))],  # sum over tokens / (2 sequences * max_len 4)
)
def test_aggregation_normalisers(agg, expected):
    logp, mask, A = _two_seqs()
    norm = aggregation_count(agg, num_sequences=2, num_tokens=4, max_len=4)
    loss, _ = grpo_loss(logp, logp, A, mask, norm, aggregation=agg)
    assert float(loss) == pytest.approx(expected)


@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo"])
def test_accumulated_micro_batches_equal_one_batch(agg):
    logp, mask, A = _two_seqs()
    norm = aggregation_count(agg, 2, 4, 4)
    whole, _ = grpo_loss(logp, logp, A, mask, norm, aggregation=agg)
    parts = sum(float(grpo_loss(logp[i:i + 1], logp[i:i + 1], A[i:i + 1], mask[i:i + 1], norm,
                                aggregation=agg)[0]) for i in range(2))
    assert parts == pytest.approx(float(whole))


def test_kl_estimators_and_penalty():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert float(kl_estimate(logp, ref, "k1")) == pytest.approx(1.0)
    # k3 = e^(ref - logp) - (ref - logp) - 1 = e^-1 + 1 - 1
    assert float(kl_estimate(logp, ref, "k3")) == pytest.approx(math.exp(-1))
    lp = torch.tensor([[-1.0]])
    loss, m = grpo_loss(lp, lp, torch.tensor([0.0]), torch.tensor([[True]]), 1.0,
                        ref_logp=torch.tensor([[-2.0]]), beta=0.1)
    assert float(loss) == pytest.approx(0.1 * math.exp(-1))
    assert float(m["grpo/kl"]) == pytest.approx(math.exp(-1))


def test_fully_masked_rows_contribute_nothing():
    logp = torch.tensor([[-1.0], [-1.0]], requires_grad=True)
    mask = torch.tensor([[True], [False]])
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0, 5.0]), mask, 1.0)
    loss.backward()
    assert float(logp.grad[1, 0]) == 0.0
    assert float(loss.detach()) == pytest.approx(-1.0)
