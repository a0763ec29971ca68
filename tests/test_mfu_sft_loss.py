"""The chunked CPU cross-entropy of ``sft_loss`` equals the plain fp32 one (issue #3).

Reference: ``F.cross_entropy(logits.float(), targets, reduction="sum")`` and
``logits.float().argmax(-1)``, the path ``sft_loss`` took before. Tolerances: fp32 logits
match to 1e-6 (only the summation order differs); for bf16 logits the gradient is cast to
bf16 on both paths, so it may differ by one bf16 rounding step (2^-8 relative) where the two
fp32 values straddle a rounding boundary, and nowhere else.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import posttrain.losses.sft as sft_mod
from posttrain.algorithms.sft import sft_step
from posttrain.data.batching import pack
from posttrain.data.chat import encode_row
from posttrain.losses.sft import sft_loss
from posttrain.models.attention import enable_packed_attention
from posttrain.models.forward import target_logits
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.tasks.registry import build_task_rows


def _reference(logits: torch.Tensor, targets: torch.Tensor, normalizer: float):
    leaf = logits.detach().clone().requires_grad_()
    nll = F.cross_entropy(leaf.float(), targets, reduction="sum")
    (nll / normalizer).backward()
    acc = (leaf.detach().float().argmax(-1) == targets).float().mean()
    return nll.detach(), leaf.grad, acc


def _chunked(logits: torch.Tensor, targets: torch.Tensor, normalizer: float,
             consume: bool = False, upstream: float = 1.0):
    leaf = logits.detach().clone().requires_grad_()
    # consume_logits overwrites its input, so hand it a temporary (as sft_step does)
    loss, m = sft_loss(leaf.clone() if consume else leaf, targets, normalizer,
                       consume_logits=consume)
    (loss * upstream).backward()
    return loss.detach(), m, leaf.grad


@pytest.fixture(params=[None, 64, 37], ids=["default-chunk", "chunk-2-rows", "ragged-chunks"])
def chunk_elements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Default chunking, and chunks of a few rows with a ragged last chunk (V = 29 below:
    64 elements -> 2 rows per chunk, 37 -> 1 row)."""
    if request.param is not None:
        monkeypatch.setattr(sft_mod, "_CHUNK_ELEMENTS", request.param)


@pytest.mark.parametrize("consume", [False, True], ids=["recompute", "consume-logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_nll_matches_fp32_cross_entropy(dtype: torch.dtype, consume: bool,
                                                chunk_elements: None):
    g = torch.Generator().manual_seed(0)
    n, v = 11, 29
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    ref_nll, ref_grad, ref_acc = _reference(logits, targets, normalizer=7.0)
    loss, m, grad = _chunked(logits, targets, normalizer=7.0, consume=consume)
    torch.testing.assert_close(loss, ref_nll / 7.0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m["sft/nll"], ref_nll / n, atol=1e-6, rtol=1e-6)
    assert m["sft/token_accuracy"].item() == ref_acc.item()
    assert grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
    else:
        diff = (grad.float() - ref_grad.float()).abs()
        ulp = ref_grad.float().abs() * 2.0**-8 + 1e-30
        assert bool((diff <= ulp).all()), float((diff / ulp).max())
        assert (grad == ref_grad).float().mean().item() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_consumed_logits_gradient_follows_an_unexpected_upstream_scale(dtype: torch.dtype):
    """DDP scales each rank's loss by the world size: the gradient written in the forward
    (for an upstream gradient of 1) is rescaled, exactly for a power of two."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 13, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 13, (6,), generator=g)
    _, _, plain = _chunked(logits, targets, normalizer=5.0, consume=True)
    _, _, scaled = _chunked(logits, targets, normalizer=5.0, consume=True, upstream=4.0)
    assert torch.equal(scaled, 4.0 * plain)
    _, _, ref = _chunked(logits, targets, normalizer=5.0, upstream=3.0)
    torch.testing.assert_close(_chunked(logits, targets, 5.0, True, 3.0)[2], ref,
                               atol=1e-6, rtol=2.0**-7)


def test_chunked_nll_gradient_is_softmax_minus_one_hot():
    """Against the closed form, not only against torch: d/dz sum_i -log softmax(z_i)[t_i]."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], requires_grad=True)
    targets = torch.tensor([0, 1])
    loss, _ = sft_loss(logits, targets, normalizer=4.0)
    loss.backward()
    want = logits.detach().softmax(-1)
    want[0, 0] -= 1
    want[1, 1] -= 1
    torch.testing.assert_close(logits.grad, want / 4.0, atol=1e-7, rtol=0)


def test_accuracy_takes_first_index_of_tied_maxima_like_argmax():
    # bf16 logits tie often; argmax (the previous metric) picks the first maximum.
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.bfloat16)
    _, m = sft_loss(logits, torch.tensor([1, 0]), normalizer=1.0)
    assert m["sft/token_accuracy"].item() == 1.0
    _, m = sft_loss(logits, torch.tensor([2, 3]), normalizer=1.0)
    assert m["sft/token_accuracy"].item() == 0.0


def test_fp32_logits_are_not_modified_in_place():
    logits = torch.randn(5, 7)
    before = logits.clone()
    loss, _ = sft_loss(logits.requires_grad_(), torch.arange(5), normalizer=1.0)
    loss.backward()
    assert torch.equal(logits.detach(), before)


def test_sft_step_bf16_matches_the_upcast_cross_entropy_step():
    """Whole SFT step on a packed tiny model under bf16 autocast: loss and every parameter
    gradient equal the previous path (fp32 logits + F.cross_entropy). The logits gradient
    differs by at most a bf16 rounding step in a few entries, so the parameter gradients
    agree to < 1e-3 in norm (a wrong softmax or a missing target term is off by O(1))."""
    tok = build_tokenizer()
    ex = [encode_row(tok, r, "messages") for r in build_task_rows("chat", size=6, seed=3)]
    batch = pack(ex)
    normalizer = float(batch["num_target_tokens"])
    results = []
    for path in ("reference", "chunked"):
        model = build_model("nano", seed=1)
        enable_packed_attention(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if path == "reference":  # the same attention as sft_step: only the loss differs
                logits, targets = target_logits(model, batch)
                assert logits.dtype == torch.float32
                loss = F.cross_entropy(logits, targets, reduction="sum") / normalizer
            else:
                loss, _ = sft_step(model, batch, normalizer)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    # Per entry: a one-ulp difference in the logits gradient can flip a bf16 rounding in the
    # backward (a 2^-8 step); over all entries the gradients agree far closer than that.
    for g, r in zip(grads, ref_grads, strict=True):
        scale = r.abs().max().item() + 1e-12
        assert (g - r).abs().max().item() <= 1e-2 * scale
    diff = sum(((g - r).double().norm() ** 2).item() for g, r in zip(grads, ref_grads,
                                                                      strict=True)) ** 0.5
    norm = sum((r.double().norm() ** 2).item() for r in ref_grads) ** 0.5
    assert diff / norm < 1e-3, diff / norm
