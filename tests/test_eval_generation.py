"""Evaluation samples with the RL rollout engine: greedy responses equal transformers'
``generate`` token for token, and the end-of-turn bookkeeping is right."""

from __future__ import annotations

import torch

from posttrain.data.chat import end_of_turn_token_id, render_prompt
from posttrain.evals.generation import generate_responses
from posttrain.models.tiny import build_model, build_tokenizer


def _hf_greedy(model, tok, prompts, max_new_tokens):
    """transformers' generate, left-padded, stopping at end of turn or EOS."""
    eot = end_of_turn_token_id(tok)
    stops = sorted({eot, tok.eos_token_id})
    ids = [render_prompt(tok, p) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    rows = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        rows.append(row if end is None else row[: end + 1])
    return rows


def test_greedy_responses_equal_transformers_generate():
    tok = build_tokenizer()
    model = build_model("nano", seed=3).eval()
    eot = end_of_turn_token_id(tok)
    # Raise end-of-turn's logit to just below the untrained model's top logit, so some
    # prompts end their turn at once and the others run to the token budget.
    bias = torch.zeros(model.config.vocab_size)
    bias[eot] = 1.08
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    prompts = [[{"role": "user", "content": f"What is {a}+{b}?"}]
               for a, b in [(1, 2), (13, 5), (40, 40), (7, 99), (2, 2), (65, 3)]]
    want = _hf_greedy(model, tok, prompts, max_new_tokens=12)
    got = generate_responses(model, tok, prompts, max_new_tokens=12, batch_size=4)
    assert {g.ended_turn for g in got} == {True, False}
    for w, g in zip(want, got, strict=True):
        body = w[:-1] if w[-1] in (eot, tok.eos_token_id) else w
        assert g.text == tok.decode(body, skip_special_tokens=False)
        assert g.num_tokens == len(w)
        assert g.ended_turn == (w[-1] == eot)


def test_ended_turn_and_budget():
    """A model that always emits end-of-turn ends every turn in one token; a budget of one
    token that is not end-of-turn does not end it."""
    tok = build_tokenizer()
    model = build_model("nano", seed=0).eval()
    eot = end_of_turn_token_id(tok)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # (tied with the embeddings) the bias alone decides
    head_bias = torch.zeros(model.config.vocab_size)
    head_bias[eot] = 10.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + head_bias)
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hello"}]]
    out = generate_responses(model, tok, prompts, max_new_tokens=5)
    assert all(r.ended_turn and r.text == "" and r.num_tokens == 1 for r in out)
    head_bias[eot], head_bias[5] = 0.0, 10.0
    out = generate_responses(model, tok, prompts, max_new_tokens=1)
    assert all(not r.ended_turn and r.num_tokens == 1 for r in out)
