"""Varlen attention on packed rows equals transformers' own masked SDPA, and padded rows."""

from __future__ import annotations

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


def test_cpu_attention_runs_in_fp32_under_bf16_autocast():
    from posttrain.models.attention import cpu_fp32_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_fp32_sdpa(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                           is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), atol=0, rtol=0)  # fp32 math, one rounding
