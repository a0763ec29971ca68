"""Supervised fine-tuning loss (seed EQ 5.1): response-masked negative log-likelihood."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sft_loss(
    logits: Tensor, targets: Tensor, normalizer: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked NLL summed over target tokens and divided by an explicit ``normalizer``.

    EQ 5.1:  L = - sum_t log pi(y_t | x, y_<t) / N

    Shapes: ``logits`` (N, V) at the N target positions only (prompt and padding positions
    were never projected); ``targets`` (N,) the token each position must predict.
    ``normalizer`` is N summed over the whole accumulated batch (all micro-batches, all
    ranks), so that accumulating micro-batch losses equals one large batch's token mean.

    Metrics (detached, means over this micro-batch): ``sft/nll``, ``sft/token_accuracy``.
    """
    if targets.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, {"sft/nll": zero.detach(), "sft/token_accuracy": zero.detach()}
    nll = F.cross_entropy(logits.float(), targets, reduction="sum")  # fp32 for a stable log-softmax
    with torch.no_grad():
        acc = (logits.argmax(-1) == targets).float().mean()
    return nll / normalizer, {"sft/nll": nll.detach() / targets.numel(), "sft/token_accuracy": acc}
