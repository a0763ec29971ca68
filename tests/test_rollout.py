"""The KV-cache rollout engine and the prefix-shared training forward."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.data.chat import render_prompt
from posttrain.models.completion import completion_logprobs
from posttrain.models.prefix import enable_prefix_attention
from posttrain.models.tiny import build_model, build_tokenizer
from posttrain.rollout import Generator, KVCacheGenerator, SamplingParams, default_stop_ids
from posttrain.rollout.batching import build_batch
from posttrain.rollout.sampling import filter_logits, sample_tokens


@pytest.fixture(scope="module")
def setup():
    model = build_model("nano", seed=0).eval()
    tok = build_tokenizer()
    enable_prefix_attention(model)
    gen = KVCacheGenerator(model, tok, stop_token_ids=default_stop_ids(model, tok))
    prompts = [render_prompt(tok, [{"role": "user", "content": q}])
               for q in ("What is 2+3?", "Add 17 and 25, please.", "Hi")]
    return model, tok, gen, prompts


def test_generator_protocol_and_layout(setup):
    _, _, gen, prompts = setup
    assert isinstance(gen, Generator)
    ro = gen.generate(prompts, 4, SamplingParams(max_new_tokens=12, seed=0))
    assert len(ro) == 12 and ro.n == 4 and ro.prompt_of(5) == 1
    for ids, lp, why in zip(ro.completion_ids, ro.logprobs, ro.finish_reasons, strict=True):
        assert len(ids) == len(lp) >= 1
        assert why in ("stop", "length")
        assert (why == "length") == (len(ids) == 12 and ids[-1] not in gen.stop_token_ids)
    # the n samples of one prompt are independent draws, not copies
    assert len({tuple(c) for c in ro.completion_ids[:4]}) > 1


def test_seeded_and_reproducible(setup):
    _, _, gen, prompts = setup
    sp = SamplingParams(max_new_tokens=16, seed=7, temperature=0.9, top_k=50, top_p=0.95)
    a, b = gen.generate(prompts, 3, sp), gen.generate(prompts, 3, sp)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    c = gen.generate(prompts, 3, SamplingParams(max_new_tokens=16, seed=8))
    assert c.completion_ids != a.completion_ids


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_sampler_logprobs_equal_teacher_forced_forward(setup, prefix_sharing):
    """So the first importance ratio is 1 (fp32, atol 1e-5 on log-probs)."""
    model, _, gen, prompts = setup
    ro = gen.generate(prompts, 4, SamplingParams(max_new_tokens=20, seed=1, temperature=0.7))
    groups = [(ro.prompt_ids[i], ro.completion_ids[i * 4:(i + 1) * 4]) for i in range(3)]
    batch = build_batch(groups, prefix_sharing)
    with torch.no_grad():
        logp, ent = completion_logprobs(model, batch, temperature=0.7, entropy="detached")
    for k, lp in enumerate(ro.logprobs):
        torch.testing.assert_close(logp[k, :len(lp)], torch.tensor(lp), atol=1e-5, rtol=0)
    assert (ent[batch["mask"]] > 0).all()


def test_prefix_shared_forward_equals_plain_per_sequence_forward():
    """fp32: log-probs and gradients of the prefix-shared packed forward == one forward per
    (prompt + completion), atol 1e-5."""
    model = build_model("nano", seed=3)
    enable_prefix_attention(model)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(4, 250, (n,), generator=g).tolist()  # noqa: E731
    groups = [(rand(7), [rand(3), rand(5), rand(1)]), (rand(4), [rand(6), rand(2)]),
              (rand(9), [rand(4)])]
    logp, _ = completion_logprobs(model, build_batch(groups, prefix_sharing=True))
    logp.sum().backward()
    shared_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    ref_total, k = 0.0, 0
    for prompt, comps in groups:
        for c in comps:
            ids = torch.tensor([prompt + c])
            lp = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            lp = lp.gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
            torch.testing.assert_close(logp[k, :len(c)].detach(), lp.detach(), atol=1e-5, rtol=0)
            ref_total = ref_total + lp.sum()
            k += 1
    ref_total.backward()
    torch.testing.assert_close(shared_grad, model.model.layers[0].self_attn.q_proj.weight.grad,
                               atol=1e-5, rtol=1e-4)
    # the prompt's tokens went through the model once per group, not once per completion
    shared, plain = build_batch(groups, True), build_batch(groups, False)
    assert shared["num_tokens"] == plain["num_tokens"] - (7 * 2 + 4 * 1)


def test_stop_tokens_and_strings(setup):
    model, tok, _, prompts = setup
    # Every token a stop token: each completion is exactly one token, finish reason stop.
    all_stop = KVCacheGenerator(model, tok, stop_token_ids=range(len(tok)))
    ro = all_stop.generate(prompts, 2, SamplingParams(max_new_tokens=8, seed=0))
    assert all(len(c) == 1 for c in ro.completion_ids) and set(ro.finish_reasons) == {"stop"}
    # A stop string: stop once the decoded text contains it (always: any one byte will do).
    gen = KVCacheGenerator(model, tok)
    text_stop = SamplingParams(max_new_tokens=30, seed=0, stop_strings=tuple(
        chr(c) for c in range(32, 127)))
    ro = gen.generate(prompts, 2, text_stop)
    for ids, why in zip(ro.completion_ids, ro.finish_reasons, strict=True):
        text = tok.decode(ids)
        assert why == "stop" and any(chr(c) in text for c in range(32, 127))
        assert not any(chr(c) in tok.decode(ids[:-1]) for c in range(32, 127))


def test_top_p_top_k_filters_and_logprob_of_sampled_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    kept = filter_logits(logits, 1.0, top_k=0, top_p=0.7)  # 0.5 < 0.7 <= 0.8: keep 2 tokens
    assert torch.isinf(kept[0, 2]) and torch.isfinite(kept[0, :2]).all()
    assert torch.isinf(filter_logits(logits, 1.0, top_k=1, top_p=1.0)[0, 1:]).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tok, lp = sample_tokens(logits, 1.0, 0, 0.7, g)
        assert int(tok) in (0, 1)
        # renormalised over the nucleus: 0.5/0.8 or 0.3/0.8
        assert float(lp) == pytest.approx(math.log([0.5, 0.3][int(tok)] / 0.8), abs=1e-6)
    tok, lp = sample_tokens(logits, 0.0, 0, 1.0, g)  # greedy
    assert int(tok) == 0 and float(lp) == pytest.approx(math.log(0.5), abs=1e-6)


def test_greedy_matches_hf_generate(setup):
    model, tok, gen, prompts = setup
    ro = gen.generate(prompts[:1], 1, SamplingParams(temperature=0.0, max_new_tokens=10))
    ids = torch.tensor([prompts[0]])
    hf = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None,
                        pad_token_id=tok.pad_token_id)[0, len(prompts[0]):].tolist()
    assert ro.completion_ids[0] == hf[:len(ro.completion_ids[0])]


def test_sampling_frequencies_match_the_distribution():
    # 200k draws from (0.5, 0.3, 0.2) at temperature 1: each frequency within 0.005
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(200_000, 3)
    tok, _ = sample_tokens(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=3) / tok.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=5e-3, rtol=0)


def test_preallocated_cache_without_padding_and_after_compaction(setup):
    """Equal-length prompts (no left padding: transformers may drop an all-ones mask) and rows
    dropped mid-generation: the sampler's log-probs still equal a plain forward per
    completion (fp32, atol 1e-5), and every completion slot was written once."""
    model, tok, gen, _ = setup
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ("ab", "cd")]
    assert len(prompts[0]) == len(prompts[1])
    stop = KVCacheGenerator(model, tok, stop_token_ids=[ord("e"), ord("a"), ord(" ")])
    for g in (gen, stop):
        ro = g.generate(prompts, 4, SamplingParams(max_new_tokens=24, seed=3))
        assert any(len(c) < 24 for c in ro.completion_ids) or g is gen
        for k, (c, lp) in enumerate(zip(ro.completion_ids, ro.logprobs, strict=True)):
            ids = torch.tensor([prompts[k // 4] + c])
            with torch.no_grad():
                ref = model(ids).logits[0, len(prompts[0]) - 1:-1].log_softmax(-1)
            ref = ref.gather(-1, ids[0, len(prompts[0]):, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(lp), ref, atol=1e-5, rtol=0)


def test_inverse_cdf_never_draws_a_filtered_token_and_top_p_fast_path_is_exact(monkeypatch):
    from posttrain.rollout import sampling

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g) * 3
    logits[:, ::2] = float("-inf")  # half the vocabulary has probability 0
    tok, lp = sample_tokens(logits.repeat(50, 1), 1.0, 0, 1.0, g)
    assert (tok % 2 == 1).all() and torch.isfinite(lp).all()
    # top-p among the top candidates == top-p over the full sort (and the fallback kicks in
    # when a nucleus is wider than the candidates)
    logits = torch.randn(32, 300, generator=g) * torch.linspace(0.1, 6, 32)[:, None]
    for p in (0.3, 0.9, 0.999):
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        ref = torch.zeros_like(probs, dtype=torch.bool).scatter(
            -1, order, (sorted_p.cumsum(-1) - sorted_p) >= p)
        for k in (16, 1024):
            monkeypatch.setattr(sampling, "_TOP_P_CANDIDATES", k)
            assert torch.equal(sampling._top_p_drop(logits, p), ref)
