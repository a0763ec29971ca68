"""Varlen attention on packed rows equals transformers' own masked SDPA, and padded rows."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.batching import pack, pad
from posttrain.data.chat import encode_row
from posttrain.models.attention import PACKED_ATTENTION, enable_packed_attention
from posttrain.models.forward import target_logits
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.tasks.registry import build_task_rows


def _examples(n: int = 5):
    tok = build_tokenizer()
    return tok, [encode_row(tok, r, "messages") for r in build_task_rows("chat", size=n, seed=2)]


def test_varlen_equals_masked_sdpa_and_padding_in_values_and_grads():
    tok, ex = _examples()
    batch = pack(ex)
    results = []
    for mode in ("sdpa-packed", "varlen-packed", "sdpa-padded"):
        model = build_model("nano", seed=1)
        if mode == "varlen-packed":
            assert enable_packed_attention(model)
            assert model.config._attn_implementation == PACKED_ATTENTION
        b = pad(ex, tok.pad_token_id) if mode == "sdpa-padded" else batch
        if mode == "sdpa-packed":
            b = {k: v for k, v in b.items() if k != "cu_seq_lens"}
        logits, targets = target_logits(model, b)
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        loss.backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    ref_logits, ref_grads = results[0]
    for logits, grads in results[1:]:
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_varlen_model_still_generates_and_pads_like_sdpa():
    tok, ex = _examples(3)
    plain, varlen = build_model("nano", seed=1), build_model("nano", seed=1)
    enable_packed_attention(varlen)
    b = pad(ex, tok.pad_token_id)
    for model in (plain, varlen):
        model.eval()
    a, _ = target_logits(plain, b)
    c, _ = target_logits(varlen, b)
    torch.testing.assert_close(a, c)
    ids = torch.tensor([ex[0].input_ids[:10]])
    out_a = plain.generate(ids, max_new_tokens=6, do_sample=False)
    out_b = varlen.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out_a, out_b)


def test_varlen_forward_builds_no_mask_but_padded_forward_does(monkeypatch):
    """transformers' (N, N) packed-sequence mask is skipped for varlen forwards only."""
    import posttrain.models.attention as attn

    tok, ex = _examples(3)
    model = build_model("nano", seed=1)
    enable_packed_attention(model)
    calls = []
    real = attn.sdpa_mask
    monkeypatch.setattr(attn, "sdpa_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    target_logits(model, pack(ex))
    assert calls == []  # packed: no mask built
    target_logits(model, pad(ex, tok.pad_token_id))
    assert calls == [1]  # padded: transformers' causal + padding mask, as before
    assert not attn._VARLEN_FORWARD.get()  # the flag does not leak out of the forward


def _sequence(length: int, heads: int, kv_heads: int, dim: int = 16, seed: int = 0):
    """q, k fp32 and v bf16 (the dtypes RoPE and a bf16 v_proj hand attention under autocast),
    each (1, heads, length, dim) with the (1, length, heads, dim) memory layout of a model."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, length, heads, dim, generator=g).transpose(1, 2)
    k = torch.randn(1, length, kv_heads, dim, generator=g).transpose(1, 2)
    v = torch.randn(1, length, kv_heads, dim, generator=g).bfloat16().transpose(1, 2)
    return [t.requires_grad_() for t in (q, k, v)]


def _reference_attention(q, k, v):
    """fp32 SDPA on the same values: (1, l, H, D) and the three input gradients."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q32, k32, v32, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)
    return out, q32, k32, v32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)], ids=["gqa", "mha"])
def test_matmul_attention_matches_fp32_sdpa_in_values_and_grads(heads: int, kv_heads: int):
    """The probabilities and score gradients are bf16 (fp32 accumulation): each result is
    within a few bf16 roundings of the fp32 kernel's (relative error ~2^-8 = 0.4%)."""
    from posttrain.models.attention import CausalMatmulAttention

    q, k, v = _sequence(37, heads, kv_heads)
    out = CausalMatmulAttention.apply(q, k, v, 16**-0.5)
    ref, q32, k32, v32 = _reference_attention(q, k, v)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad.bfloat16())
    ref.backward(grad.bfloat16().float())
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert q.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2
    for mine, theirs in ((q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        assert _rel(mine, theirs) < 1.5e-2
    # causality: the first query attends only to the first key, so its output is v[0]
    torch.testing.assert_close(out[0, 0].float(), v[0, :, 0].float().repeat_interleave(
        heads // kv_heads, 0), atol=0, rtol=0)


def test_varlen_attention_takes_matmul_path_only_for_short_training_sequences(monkeypatch):
    import posttrain.models.attention as attn

    calls: list[int] = []
    real = attn.CausalMatmulAttention.apply
    monkeypatch.setattr(attn.CausalMatmulAttention, "apply",
                        lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    monkeypatch.setattr(attn, "MATMUL_ATTENTION_MAX_LEN", 20)
    lengths = [7, 25, 12]
    q, k, v = _sequence(sum(lengths), 6, 2)
    out = attn._varlen_sdpa(q, k, v, lengths, None)
    assert calls == [7, 12]  # the 25-token sequence took the flash kernel
    pieces = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
    ref = torch.cat([_reference_attention(a, b, c)[0] for a, b, c in pieces], 1)
    assert out.dtype == torch.float32 and _rel(out, ref) < 1e-2
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v))
    calls.clear()
    with torch.no_grad():  # inference: the fp32 flash kernel, as before
        attn._varlen_sdpa(q, k, v, lengths, None)
    assert calls == []
