"""PPO's pieces against hand-derived numbers (seed §5.4, EQ 5.3 / 5.4)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.ppo import (
    adaptive_kl_beta,
    explained_variance,
    gae,
    kl_penalized_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

E = math.e


def test_gae_three_steps_by_hand():
    """gamma = 0.9, lambda = 0.5, r = (0, 0, 1), V = (0.5, 0.6, 0.7), V after the end = 0:

        delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3
        delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03
        delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04
        A_2 = 0.3
        A_1 = 0.03 + 0.45 * 0.3   = 0.165
        A_0 = 0.04 + 0.45 * 0.165 = 0.11425
        R = A + V = (0.61425, 0.765, 1.0)

    Row 2 is the same episode cut after two tokens (then padding): its second token is
    terminal, so delta_1 = 0 + 0 - 0.6 and A_0 = 0.04 + 0.45 * (-0.6).
    """
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    v = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv[0], torch.tensor([0.11425, 0.165, 0.3]))
    torch.testing.assert_close(ret[0], torch.tensor([0.61425, 0.765, 1.0]))
    torch.testing.assert_close(adv[1], torch.tensor([0.04 + 0.45 * -0.6, -0.6, 0.0]))
    torch.testing.assert_close(ret[1], torch.tensor([0.04 + 0.45 * -0.6 + 0.5, 0.0, 0.0]))


def test_gae_lambda_one_is_return_minus_value_and_lambda_zero_is_td():
    r = torch.tensor([[0.1, -0.2, 1.0]])
    v = torch.tensor([[0.3, 0.4, 0.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[0.9, 0.8, 1.0]]))  # reward-to-go
    adv0, _ = gae(r, v, mask, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv0, torch.tensor([[0.1 + 0.4 - 0.3, -0.2 + 0.5 - 0.4, 0.5]]))


def test_kl_penalized_rewards_sum_to_score_minus_beta_kl():
    """EQ 5.3 per token: r_t = -beta * (logp - logp_ref)_t, score on the last real token."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    r, kl = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]]))
    torch.testing.assert_close(r.sum(-1), torch.tensor([2.0, -1.0]) - 0.1 * kl.sum(-1))


def _loss(ratio: float, adv: float, **kw) -> tuple[torch.Tensor, torch.Tensor, dict]:
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, m = ppo_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[adv]]),
                              torch.ones(1, 1, dtype=torch.bool), 1.0, **kw)
    loss.backward()
    return loss.detach(), logp.grad[0, 0], m


def test_clipped_surrogate_ratio_e_clips_to_1_2():
    """EQ 5.4 with eps = 0.2 and ratio e = 2.718:
    A = +1: min(e * 1, 1.2 * 1) = 1.2 -> loss -1.2, clipped, so no gradient;
    A = -1: min(-e, -1.2) = -e        -> loss  e,   unclipped: d loss / d logp = e."""
    loss, grad, m = _loss(E, 1.0, epsilon=0.2)
    assert float(loss) == pytest.approx(-1.2) and float(grad) == 0.0
    assert float(m["ppo/clipfrac"]) == 1.0
    loss, grad, _ = _loss(E, -1.0, epsilon=0.2)
    assert float(loss) == pytest.approx(E) and float(grad) == pytest.approx(E)


def test_clipped_surrogate_small_ratio_both_signs():
    """ratio 1/e = 0.368: A = -1: min(-0.368, -0.8) = -0.8 -> loss 0.8 (clipped, no grad);
    A = +1: min(0.368, 0.8) = 0.368 -> loss -0.368 (unclipped, grad -0.368)."""
    loss, grad, _ = _loss(1 / E, -1.0, epsilon=0.2)
    assert float(loss) == pytest.approx(0.8) and float(grad) == 0.0
    loss, grad, _ = _loss(1 / E, 1.0, epsilon=0.2)
    assert float(loss) == pytest.approx(-1 / E) and float(grad) == pytest.approx(-1 / E)
    loss, grad, m = _loss(1.1, 0.5, epsilon=0.2)  # inside the trust region: plain rho * A
    assert float(loss) == pytest.approx(-0.55) and float(m["ppo/clipfrac"]) == 0.0


def test_dual_clip_caps_negative_advantage_loss():
    """ratio e^2 = 7.39, A = -1: the plain clipped loss is 7.39; dual clip c = 3 caps it
    at -c * A = 3 (no gradient). Positive advantages are untouched."""
    loss, grad, m = _loss(E**2, -1.0, epsilon=0.2, dual_clip=3.0)
    assert float(loss) == pytest.approx(3.0) and float(grad) == 0.0
    assert float(m["ppo/dual_clipfrac"]) == 1.0
    loss, _, _ = _loss(E**2, -1.0, epsilon=0.2)
    assert float(loss) == pytest.approx(E**2)
    loss, _, _ = _loss(E**2, 1.0, epsilon=0.2, dual_clip=3.0)
    assert float(loss) == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="dual_clip"):
        _loss(1.0, 1.0, dual_clip=0.5)


def test_policy_loss_normalises_tokens_and_entropy_bonus():
    """Two tokens plus one padding token, normaliser 2: loss = (-A1 - A2 - c (H1 + H2)) / 2
    at ratio 1; approx_kl (k3) is 0 at ratio 1."""
    logp = torch.zeros(1, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 3.0, 100.0]])
    ent = torch.tensor([[0.5, 1.5, 100.0]])
    mask = torch.tensor([[True, True, False]])
    loss, m = ppo_policy_loss(logp, torch.zeros(1, 3), adv, mask, 2.0, entropy=ent,
                              entropy_coef=0.1)
    assert float(loss.detach()) == pytest.approx((-4.0 - 0.1 * 2.0) / 2)
    assert float(m["ppo/entropy"]) == pytest.approx(1.0)
    assert float(m["ppo/approx_kl"]) == 0.0
    with pytest.raises(ValueError, match="entropy"):
        ppo_policy_loss(logp, torch.zeros(1, 3), adv, mask, 2.0, entropy_coef=0.1)


def test_value_clipping_by_hand():
    """V_old = 1, R = 2, c = 0.2.
    V = 1.5: V_clip = 1.2, (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64 -> 0.5 * 0.64 = 0.32, clipped
             term active, and its gradient w.r.t. V is 0 (V_clip is constant beyond c);
    V = 0.9: V_clip = 0.9 -> 0.5 * 1.21 = 0.605, inactive, gradient (V - R) = -1.1;
    V = 1.5 with R = 1.3: 0.5 * 0.04 = 0.02 (the unclipped term is larger), inactive."""
    v = torch.tensor([[1.5, 0.9, 1.5]], requires_grad=True)
    old = torch.ones(1, 3)
    ret = torch.tensor([[2.0, 2.0, 1.3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = ppo_value_loss(v, old, ret, mask, 3.0, clip_range=0.2)
    assert float(loss.detach()) == pytest.approx((0.32 + 0.605 + 0.02) / 3)
    assert float(m["ppo/value_clipfrac"]) == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, -1.1, 0.2]]) / 3)
    plain, m = ppo_value_loss(v.detach(), old, ret, mask, 3.0, clip_range=None)
    assert float(plain) == pytest.approx((0.125 + 0.605 + 0.02) / 3)
    assert float(m["ppo/value_clipfrac"]) == 0.0


def test_adaptive_kl_controller_update():
    """Ziegler et al. 2019: e = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon.
    KL 12 vs target 6: e = clip(1) = 0.2 -> 0.1 * (1 + 0.2 * 100/10000) = 0.1002;
    KL 5.7: e = -0.05 -> 0.1 * (1 - 0.05 * 0.01) = 0.09995; on target: unchanged."""
    assert adaptive_kl_beta(0.1, 12.0, 6.0, 10000, 100) == pytest.approx(0.1002)
    assert adaptive_kl_beta(0.1, 5.7, 6.0, 10000, 100) == pytest.approx(0.09995)
    assert adaptive_kl_beta(0.1, 6.0, 6.0, 10000, 100) == pytest.approx(0.1)
    assert adaptive_kl_beta(0.1, 0.0, 6.0, 10, 10) == pytest.approx(0.08)  # e = -0.2


def test_kl_controller_state_roundtrip():
    from posttrain.algorithms.ppo import KLController

    ctl = KLController(0.1, target=6.0, horizon=10)
    ctl.update(12.0, 10)
    assert ctl.beta == pytest.approx(0.12)
    fixed = KLController(0.1, target=None, horizon=10)
    fixed.update(100.0, 10)
    assert fixed.beta == 0.1
    fixed.load_state_dict(ctl.state_dict())
    assert fixed.beta == pytest.approx(0.12)


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = masked_whiten(x, mask)
    assert float(w[mask].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(w[mask].std(correction=0)) == pytest.approx(1.0, abs=1e-4)
    assert float(w[1, 2]) == 0.0
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    assert explained_variance(ret, ret, m) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.0), ret, m) == pytest.approx(0.0)
    # V = R + noise of variance 2/3 vs Var(R) = 2/3 -> 0
    assert explained_variance(ret + torch.tensor([[1.0, 0.0, -1.0]]), ret, m) == pytest.approx(0)
