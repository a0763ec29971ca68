"""Preference losses against hand-derived numbers (seed §5.3 / §5.5 worked examples)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.preference import (
    bradley_terry_loss,
    chosen_nll,
    dpo_loss,
    kto_loss,
    margin_instrument,
    orpo_loss,
    simpo_loss,
)

t = lambda *xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
close = lambda a, b, tol=1e-5: abs(float(a) - b) < tol  # noqa: E731


def test_bradley_terry_seed_worked_example():
    # Seed §5.3: r(y_w) = 2.5, r(y_l) = 1.5 -> sigma(1) = 1 / (1 + 0.3679) = 0.731.
    loss, m = bradley_terry_loss(t(2.5), t(1.5), normalizer=1.0)
    assert close(math.exp(-float(loss)), 0.731, 5e-4)
    assert close(loss, -math.log(1 / (1 + math.exp(-1))))  # 0.313262
    assert m["rm/accuracy"] == 1 and close(m["rm/margin"], 1.0)
    assert close(m["rm/chosen"], 2.5) and close(m["rm/rejected"], 1.5)


def test_bradley_terry_margin_and_centering():
    # Margin m = 0.5 is subtracted: -log sigma(1 - 0.5) = log(1 + e^-0.5) = 0.474077.
    loss, _ = bradley_terry_loss(t(2.5), t(1.5), 1.0, margin=t(0.5))
    assert close(loss, 0.474077)
    # Centring adds c (r_w + r_l)^2 = 0.01 * 4^2 = 0.16.
    loss, _ = bradley_terry_loss(t(2.5), t(1.5), 1.0, center_weight=0.01)
    assert close(loss, 0.313262 + 0.16)


def test_dpo_seed_margin_and_loss():
    # Seed §5.5: beta = 0.1, log-ratios 2 and -3 -> margin 0.1 * (2 - (-3)) = 0.5.
    loss, m = dpo_loss(t(2.0), t(-3.0), t(0.0), t(0.0), 1.0, beta=0.1)
    assert close(m["dpo/margin"], 0.5)
    assert close(loss, math.log(1 + math.exp(-0.5)))  # -log sigma(0.5) = 0.474077
    assert close(m["rewards/chosen"], 0.2) and close(m["rewards/rejected"], -0.3)
    assert close(m["rewards/margins"], 0.5) and m["rewards/accuracies"] == 1
    # Log-ratios, not log-probs, matter: shifting both policy and reference changes nothing.
    loss2, _ = dpo_loss(t(-8.0), t(-20.0), t(-10.0), t(-17.0), 1.0, beta=0.1)
    assert close(loss2, float(loss))


def test_dpo_gradient_is_sigma_of_minus_margin():
    # Seed: |dL/dmargin| = sigma(-margin); at margin 8 it is 0.0003 (a solved pair is inert).
    for margin, expected in ((8.0, 0.000335), (0.0, 0.5), (-2.0, 0.880797)):
        pc = torch.tensor([margin], requires_grad=True)
        loss, _ = dpo_loss(pc, t(0.0), t(0.0), t(0.0), 1.0, beta=1.0)
        loss.backward()
        assert close(-pc.grad, expected, 1e-6)


def test_dpo_variants_hand_derived():
    args = (t(2.0), t(-3.0), t(0.0), t(0.0), 1.0)  # h = 5, beta h = 0.5
    lp, ln = math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(0.5))  # 0.474077, 0.974077
    # cDPO, eps = 0.1: 0.9 * 0.474077 + 0.1 * 0.974077 = 0.524077
    loss, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    assert close(loss, 0.9 * lp + 0.1 * ln) and close(loss, 0.524077)
    # rDPO, eps = 0.1: (0.9 * 0.474077 - 0.1 * 0.974077) / 0.8 = 0.411577
    loss, _ = dpo_loss(*args, beta=0.1, variant="robust", label_smoothing=0.1)
    assert close(loss, 0.411577)
    # IPO, tau = 0.1: (h - 1/(2 tau))^2 = (5 - 5)^2 = 0; with h = 2: (2 - 5)^2 = 9.
    loss, _ = dpo_loss(*args, beta=0.1, variant="ipo")
    assert close(loss, 0.0)
    loss, _ = dpo_loss(t(1.0), t(-1.0), t(0.0), t(0.0), 1.0, beta=0.1, variant="ipo")
    assert close(loss, 9.0)
    # Hinge (SLiC): max(0, 1 - 0.5) = 0.5; a margin past 1 costs nothing.
    loss, _ = dpo_loss(*args, beta=0.1, variant="hinge")
    assert close(loss, 0.5)
    loss, _ = dpo_loss(t(20.0), t(0.0), t(0.0), t(0.0), 1.0, beta=0.1, variant="hinge")
    assert close(loss, 0.0)
    with pytest.raises(ValueError, match="unknown DPO variant"):
        dpo_loss(*args, variant="nope")


def test_simpo_hand_derived():
    # beta = 2, gamma = 1, avg logps -0.5 and -1.5: z = -1 + 3 - 1 = 1 -> -log sigma(1)
    loss, m = simpo_loss(t(-0.5), t(-1.5), 1.0, beta=2.0, gamma=1.0)
    assert close(loss, 0.313262)
    assert close(m["rewards/chosen"], -1.0) and close(m["rewards/rejected"], -3.0)


def test_orpo_hand_derived():
    # p_w = 0.5 -> odds 1, log-odds 0; p_l = 0.2 -> odds 0.25, log-odds -1.386294.
    # log OR = 1.386294 -> sigma = 4/5 = 0.8 -> -log 0.8 = 0.223144; NLL = -log 0.5 = 0.693147
    # L = 0.693147 + 0.1 * 0.223144 = 0.715461
    loss, m = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), 1.0, lam=0.1)
    assert close(loss, 0.715461)
    assert close(m["orpo/log_odds_ratio"], math.log(4.0)) and close(m["orpo/nll"], 0.693147)


def test_kto_hand_derived():
    # beta = 0.1, z0 = 0.5. Desirable r = 1: 1 - sigma(0.1 * (1 - 0.5)) = 1 - sigma(0.05)
    #   = 1 - 0.512497 = 0.487503.  Undesirable r = -2, weight 2:
    #   2 * (1 - sigma(0.1 * (0.5 + 2))) = 2 * (1 - 0.562177) = 0.875646.  Sum / 2 = 0.681575
    loss, m = kto_loss(t(1.0, -2.0), t(0.0, 0.0), torch.tensor([True, False]), t(0.5), 2.0,
                       beta=0.1, undesirable_weight=2.0)
    assert close(loss, 0.681575)
    assert close(m["rewards/chosen"], 0.1) and close(m["rewards/rejected"], -0.2)
    # A negative KL estimate is clamped to 0: 1 - sigma(0.1) = 0.475021.
    loss, m = kto_loss(t(1.0), t(0.0), torch.tensor([True]), t(-3.0), 1.0, beta=0.1)
    assert close(loss, 0.475021) and float(m["kto/kl"]) == 0.0 and "rewards/rejected" not in m


def test_chosen_nll_term():
    loss, m = chosen_nll(t(-0.5, -1.5), 4.0, weight=2.0)  # 2 * (0.5 + 1.5) / 4 = 1.0
    assert close(loss, 1.0) and close(m["dpo/chosen_nll"], 1.0)


def test_instrument_saturated_and_misordered():
    # sigma(-5) = 0.0067 and sigma(-8) = 0.0003 are < 0.01: 2 of 4 saturated; 1 misordered.
    m = margin_instrument(t(-1.0, 0.5, 5.0, 8.0), "dpo")
    assert close(m["dpo/saturated_frac"], 0.5) and close(m["dpo/misordered_frac"], 0.25)
    # sigma(-4) = 0.018: not yet saturated.
    assert float(margin_instrument(t(4.0), "dpo")["dpo/saturated_frac"]) == 0.0


@pytest.mark.parametrize("name", ["bt", "dpo", "ipo", "simpo", "orpo"])
def test_sum_over_normalizer_equals_one_big_batch(name):
    # Two micro-batches divided by the global pair count == one batch of all four pairs.
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (-torch.rand(4, generator=g) * 3 for _ in range(4))

    def f(sl, n):
        if name == "bt":
            return bradley_terry_loss(a[sl], b[sl], n)[0]
        if name in ("dpo", "ipo"):
            return dpo_loss(a[sl], b[sl], c[sl], d[sl], n, variant=name)[0]
        return (simpo_loss if name == "simpo" else orpo_loss)(a[sl] / 4, b[sl] / 4, n)[0]

    split = f(slice(0, 1), 4.0) + f(slice(1, 4), 4.0)
    assert torch.allclose(split, f(slice(0, 4), 4.0), atol=1e-6)
