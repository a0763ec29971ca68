"""Prefix-shared pair forwards (DESIGN.md §5.1): each DPO pair's prompt is computed once, and
every log-prob, gradient, reference value and training step equals the plain packed forward."""

from __future__ import annotations

import json
import random

import pytest
import torch

from posttrain.algorithms import preference as P
from posttrain.algorithms.preference import DPOConfig, train_preference
from posttrain.config import load_config
from posttrain.data.batching import pack
from posttrain.data.chat import Encoded, encode_preference
from posttrain.data.pairs import encode_pairs
from posttrain.models.logprobs import (
    AdapterDisabledReference,
    FrozenReference,
    precompute_reference,
    sequence_logprobs,
)
from posttrain.models.lora import LoraConfig, apply_lora
from posttrain.models.prefix import (
    enable_prefix_attention,
    pack_groups,
    pack_pairs,
    shared_prefix_len,
)
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.train.metrics import read_metrics

# fp32 tolerances: sequence log-probs are sums of ~20-60 token log-probs of magnitude ~5, and
# the two forwards add the same numbers in a different order (batched vs per-sequence SDPA).
ATOL, RTOL = 1e-4, 1e-5
WORDS = ("alpha", "beta", "gamma", "delta", "vault", "secret", "answer", "river", "stone")


def _enc(ids: list[int], mask: list[int]) -> Encoded:
    return Encoded(ids, mask)


def test_shared_prefix_stops_at_first_difference_and_first_target():
    a = _enc([1, 2, 3, 4, 5], [0, 0, 0, 1, 1])
    b = _enc([1, 2, 3, 7, 8, 9], [0, 0, 0, 1, 1, 1])
    assert shared_prefix_len([a, b]) == 3  # the whole prompt
    c = _enc([1, 2, 3, 4, 6], [0, 0, 0, 1, 1])  # same first response token: a target, unshared
    assert shared_prefix_len([a, c]) == 3
    d = _enc([1, 9, 3, 4, 6], [0, 0, 0, 1, 1])  # prompts differ at token 1
    assert shared_prefix_len([a, d]) == 1
    e = _enc([5, 2, 3, 4], [0, 0, 1, 1])
    assert shared_prefix_len([a, e]) == 0


def test_pack_pairs_row_positions_and_targets():
    a = _enc([1, 2, 3, 4, 5], [0, 0, 0, 1, 1])
    b = _enc([1, 2, 3, 7, 8, 9], [0, 0, 0, 1, 1, 0])
    x = _enc([6, 4], [0, 1])  # a pair sharing nothing: two singletons, as in pack()
    y = _enc([5, 4, 3], [0, 1, 1])
    batch = pack_pairs([a, b, x, y])
    # row: [1 2 3 | 4 5 | 7 8 9] [6 | 4] [5 | 4 3]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 6, 4, 5, 4, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 0, 1, 2]]
    # targets 4,5 (a) from rows 2,3; 7,8 (b) from rows 2,5 (9 is no target); 4 (x); 4,3 (y)
    assert batch["pred_pos"].tolist() == [2, 3, 2, 5, 8, 10, 11]
    assert batch["targets"].tolist() == [4, 5, 7, 8, 4, 4, 3]
    assert batch["target_seq"].tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert batch["num_sequences"] == 4 and batch["num_tokens"] == 13
    assert batch["num_unshared_tokens"] == 16  # 3 prompt tokens saved
    # gather layout: each sequence's tokens in the shared row, prompt rows repeated
    lay = batch["prefix_layout"]
    assert lay.unshared_idx.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12]
    assert lay.cu_seq_lens.tolist() == [0, 5, 11, 13, 16]
    assert lay.pick.tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15]
    masked = pack_pairs([a, b, x, y], attention="masked")
    assert torch.equal(masked["pred_pos"], batch["pred_pos"])
    assert masked["prefix_layout"].comp_mask.shape == (4, 1, 3, 3 + 3)  # Nc, 1, L, P + L


def _long_pairs(tok, n: int = 6, seed: int = 0) -> list[Encoded]:
    """Pairs with >= 100-token prompts (byte tokenizer: a token per character), chat-message
    and plain-string prompts, responses that share their first words, and one pair whose
    prompts differ (packed as two singletons)."""
    rng = random.Random(seed)
    words = WORDS
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    seqs = []
    for i in range(n):
        prompt = f"Context {i}: {text(20)}. Question: what is {i} + {i + 3}?"
        chosen, rejected = f"The answer is {2 * i + 3}. {text(rng.randint(2, 8))}", text(3)
        if i % 2:
            row = {"prompt": [{"role": "user", "content": prompt}],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}
        else:
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        seqs += encode_preference(tok, row)
    assert min(s.loss_mask.index(1) for s in seqs) >= 100
    # the last pair's prompts differ in their final character: only a partial prefix is shared
    last = seqs[-1]
    cut = last.loss_mask.index(1) - 1
    seqs[-1] = Encoded(last.input_ids[:cut] + [last.input_ids[cut] ^ 1] + last.input_ids[cut + 1:],
                       last.loss_mask)
    return seqs


@pytest.mark.parametrize("attention", ["gather", "masked"])
def test_prefix_shared_logprobs_and_grads_equal_packed_forward(attention):
    tok = build_tokenizer()
    seqs = _long_pairs(tok)
    model = build_model("nano", seed=0)
    enable_prefix_attention(model)  # serves both kinds of batch
    shared, plain = pack_pairs(seqs, attention), pack(seqs)
    assert shared["num_tokens"] < 0.65 * plain["num_tokens"]  # prompts >= 100 tokens, once
    out = {}
    for name, batch in (("shared", shared), ("plain", plain)):
        model.zero_grad()
        logps, lengths = sequence_logprobs(model, batch)
        (logps * torch.linspace(-1, 1, len(seqs))).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        out[name] = (logps.detach(), lengths, grads)
    torch.testing.assert_close(out["shared"][0], out["plain"][0], atol=ATOL, rtol=RTOL)
    assert torch.equal(out["shared"][1], out["plain"][1])
    for n, g in out["plain"][2].items():
        torch.testing.assert_close(out["shared"][2][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_prefix_sharing_through_lora_and_both_references():
    tok = build_tokenizer()
    seqs = _long_pairs(tok, n=4, seed=1)
    model = build_model("nano", seed=1)
    enable_prefix_attention(model)
    frozen = FrozenReference(model)  # the copy keeps the prefix attention
    shared, plain = pack_pairs(seqs), pack(seqs)
    torch.testing.assert_close(frozen.logprobs(shared), frozen.logprobs(plain), atol=ATOL,
                               rtol=RTOL)
    lora = apply_lora(model, LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    # peft forwards prefix_layout and logits_to_keep to the wrapped model
    torch.testing.assert_close(sequence_logprobs(lora, shared)[0],
                               sequence_logprobs(lora, plain)[0], atol=ATOL, rtol=RTOL)
    base = AdapterDisabledReference(lora)
    torch.testing.assert_close(base.logprobs(shared), frozen.logprobs(plain), atol=ATOL,
                               rtol=RTOL)


def test_precomputed_reference_with_shared_prompts_equals_packed():
    tok = build_tokenizer()
    seqs = encode_pairs("task:safety_pairs:size=10", tok, max_length=128).sequences()
    model = build_model("nano", seed=0)
    enable_prefix_attention(model)
    ref = FrozenReference(model)
    a, _ = precompute_reference(ref, seqs, batch_size=6, collate=pack_pairs)
    b, _ = precompute_reference(ref, seqs, batch_size=6)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="even number"):
        pack_pairs(seqs[:3])


def test_groups_of_more_than_two_and_empty_suffix():
    # a group of 3 sharing a prompt, and a one-token sequence (empty suffix after its prompt)
    model = build_model("nano", seed=2)
    enable_prefix_attention(model)
    g = [_enc([5, 6, 7, 8, 9], [0, 0, 0, 1, 1]), _enc([5, 6, 7, 10], [0, 0, 0, 1]),
         _enc([5, 6, 7, 11, 12, 13], [0, 0, 0, 1, 0, 1])]
    single = [_enc([4], [0])]
    want, n2 = sequence_logprobs(model, pack([*g, *single]))
    for attention in ("gather", "masked"):
        shared = pack_groups([g, single], attention)
        assert shared["num_tokens"] == 15 - 6 + 1
        got, n = sequence_logprobs(model, shared)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert n.tolist() == n2.tolist() == [2, 1, 2, 0]
    with pytest.raises(ValueError, match="gather"):
        pack_groups([g], "flash")


# ---- the recipe ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_prompt_jsonl(tmp_path_factory):
    """Preference rows with >= 100-token chat prompts and variable responses."""
    rng = random.Random(3)
    words = WORDS
    rows = []
    for i in range(24):
        ctx = " ".join(rng.choice(words) for _ in range(22))
        rows.append({
            "prompt": [{"role": "user", "content": f"{ctx}. Is {i} even?"}],
            "chosen": [{"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}],
            "rejected": [{"role": "assistant",
                          "content": ("no" if i % 2 == 0 else "yes") + " " * rng.randint(0, 9)
                          + "maybe"}],
        })
    path = tmp_path_factory.mktemp("pref") / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, data, name, *extra):
    return load_config(DPOConfig, None, [
        "model=tiny:nano", f"data={data}", f"output_dir={tmp_path / name}", "max_steps=2",
        "batch_size=6", "lr=3e-3", "warmup_steps=0", "max_length=256", "precision=fp32",
        f"ref_cache_dir={tmp_path / 'cache'}", *extra])


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_dpo_run_with_prefix_sharing_equals_without(tmp_path, long_prompt_jsonl, loss):
    runs = {}
    for on in (True, False):
        name = f"{loss}-{on}"
        train_preference(_cfg(tmp_path, long_prompt_jsonl, name, f"loss={loss}",
                              f"prefix_sharing={str(on).lower()}"))
        runs[on] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl")
                    if "train/loss" in r]
    on, off = runs[True], runs[False]
    assert len(on) == len(off) == 2
    assert on[0]["perf/prefix_saved_frac"] > 0.4 and "perf/prefix_saved_frac" not in off[0]
    assert on[0]["perf/tokens"] < 0.6 * off[0]["perf/tokens"]
    for k in ("train/loss", "train/grad_norm", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        for step in (0, 1):  # step 2 also agrees: the first updates were the same
            assert on[step][k] == pytest.approx(off[step][k], rel=1e-4, abs=1e-4), (k, step)


def test_attention_that_cannot_share_falls_back_to_packing(tmp_path, long_prompt_jsonl,
                                                            monkeypatch):
    monkeypatch.setattr(P, "enable_prefix_attention", lambda model: False)
    cfg = _cfg(tmp_path, long_prompt_jsonl, "fallback", "max_steps=1")
    train_preference(cfg)
    # The run's config.yaml says what ran; the caller's config is left as it was.
    ran = load_config(DPOConfig, tmp_path / "fallback" / "config.yaml")
    assert ran.prefix_sharing is False and cfg.prefix_sharing is True
    rows = read_metrics(tmp_path / "fallback" / "metrics.jsonl")
    assert not any("perf/prefix_saved_frac" in r for r in rows)


def test_flash_attention_is_left_alone():
    model = build_model("nano", seed=0)
    model.config._attn_implementation = "flash_attention_2"  # kernels that pack natively
    assert not enable_prefix_attention(model)
    assert model.config._attn_implementation == "flash_attention_2"
