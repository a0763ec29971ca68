import math

import torch

from posttrain.losses.sft import sft_loss


def test_sft_loss_matches_hand_derivation():
    # Two target positions over a vocabulary of 3.
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1])
    # -log softmax by hand: pos0: -(2 - log(e^2 + 2)); pos1: -(1 - log(1 + e + e^3)).
    nll0 = -(2 - math.log(math.e**2 + 2))
    nll1 = -(1 - math.log(1 + math.e + math.e**3))
    loss, m = sft_loss(logits, targets, normalizer=4.0)
    torch.testing.assert_close(loss, torch.tensor((nll0 + nll1) / 4.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(m["sft/nll"], torch.tensor((nll0 + nll1) / 2), atol=1e-6, rtol=0)
    assert m["sft/token_accuracy"].item() == 0.5  # argmax is right at pos0 only


def test_sft_loss_normalizer_splits_sum_across_micro_batches():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5), torch.randint(0, 5, (6,))
    whole, _ = sft_loss(logits, targets, normalizer=6.0)
    a, _ = sft_loss(logits[:2], targets[:2], normalizer=6.0)
    b, _ = sft_loss(logits[2:], targets[2:], normalizer=6.0)
    torch.testing.assert_close(a + b, whole, atol=1e-6, rtol=0)


def test_empty_target_set_gives_zero_loss_with_grad():
    logits = torch.randn(0, 4, requires_grad=True)
    loss, _ = sft_loss(logits, torch.zeros(0, dtype=torch.long), normalizer=1.0)
    assert loss.item() == 0.0
    loss.backward()
