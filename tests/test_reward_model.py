"""Reward models: scalar head on the tiny Llama, packed scoring, BT training, scoring API."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from posttrain.algorithms.reward_model import RMConfig, train_reward_model
from posttrain.config import load_config
from posttrain.data.batching import pack, pad
from posttrain.data.chat import encode_prompt_completion
from posttrain.errors import DataError, PosttrainError
from posttrain.models.attention import enable_packed_attention
from posttrain.models.reward import load_reward_model, sequence_rewards
from posttrain.models.tiny import build_tokenizer
from posttrain.rewards.reward_model import RewardModel
from posttrain.tasks.safety import REFUSAL
from posttrain.train.metrics import read_metrics

USER = [{"role": "user", "content": "What is the password for the vault?"}]


def _seqs(tok, *answers):
    return [encode_prompt_completion(tok, USER, [{"role": "assistant", "content": a}])
            for a in answers]


def test_packed_scores_equal_padded_and_hf_forward(nano_dir):
    tok = build_tokenizer()
    model = load_reward_model(str(nano_dir))  # a causal-LM checkpoint: new scalar head
    model.config.pad_token_id = tok.pad_token_id
    enable_packed_attention(model)
    seqs = _seqs(tok, "No.", "The password for the vault is 1234.", REFUSAL)
    packed = sequence_rewards(model, pack(seqs))
    padded = sequence_rewards(model, pad(seqs, tok.pad_token_id))
    b = pad(seqs, tok.pad_token_id)
    hf = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.squeeze(-1)
    assert packed.shape == (3,)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, hf, atol=1e-5, rtol=1e-5)


def test_pad_equal_to_eos_does_not_move_the_scored_token(nano_dir):
    # SmolLM2-style tokenizers use pad = eos = <|im_end|>, which also ends every turn: HF's
    # forward then scores the token *before* <|im_end|>; sequence_rewards does not.
    tok = build_tokenizer()
    model = load_reward_model(str(nano_dir))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = _seqs(tok, "Yes.")
    seqs[0].input_ids = seqs[0].input_ids[:-1]  # end on <|im_end|> (drop the trailing "\n")
    seqs[0].loss_mask = seqs[0].loss_mask[:-1]
    ours = sequence_rewards(model, pack(seqs))
    model.config.pad_token_id = im_end
    b = pad(seqs, im_end)
    hf = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.squeeze(-1)
    model.config.pad_token_id = tok.pad_token_id
    b2 = pad(seqs, tok.pad_token_id)
    right = model(input_ids=b2["input_ids"], attention_mask=b2["attention_mask"]).logits
    torch.testing.assert_close(ours, right.squeeze(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, hf, atol=1e-4)


def test_rm_learns_heldout_accuracy_and_scores(tmp_path):
    # off_topic=0: refusal vs compliance and answer vs refusal only, which a nano model
    # learns in 60 steps (relevance, the off-topic pairs, takes the demo's larger budget).
    out = tmp_path / "rm"
    cfg = load_config(RMConfig, None, [
        "model=tiny:nano", "data=task:safety_pairs:size=960,off_topic=0",
        "eval_data=task:safety_pairs:size=100,off_topic=0", f"output_dir={out}", "max_steps=60",
        "batch_size=16", "lr=3e-3", "warmup_steps=3", "max_length=128"])
    final = train_reward_model(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    ev = [r for r in rows if "eval/accuracy" in r][-1]
    assert ev["eval/accuracy"] >= 0.9, ev
    assert {"rm/accuracy", "rm/margin", "rm/chosen", "rm/rejected",
            "rm/saturated_frac"} <= set().union(*rows)
    # Saved in HF format; plain transformers loads it as a sequence classifier.
    hf = AutoModelForSequenceClassification.from_pretrained(final)
    assert hf.config.num_labels == 1
    # The scoring API: a refusal beats a compliance on a held-out phrasing.
    rm = RewardModel(final, batch_size=2)
    prompts = [[{"role": "user", "content": "Remind me of the passcode for the lab."}]] * 2
    s = rm.score(prompts, [REFUSAL, "Sure, it is 4821."])
    assert len(s) == 2 and s[0] > s[1]
    assert rm(["a"], ["b"]) and isinstance(rm(["a"], ["b"])[0], float)
    with pytest.raises(PosttrainError, match="completions"):
        rm.score(prompts, ["x"])


def test_rm_bad_rows_error_or_are_counted(tmp_path):
    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    bad = [{"prompt": "Q?", "chosen": "yes"}, {"prompt": "Q?", "chosen": " ", "rejected": "no"},
           {"prompt": "Q?", "chosen": "same", "rejected": "same"}]
    messages = ["format 'preference'.*got keys chosen, prompt",
                "field 'chosen': expected a non-empty string", "different from 'chosen'"]
    for i, (row, msg) in enumerate(zip(bad, messages, strict=True)):
        data = tmp_path / f"bad{i}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in (good, row, good)))
        base = ["model=tiny:nano", f"data={data}", "max_steps=1", "batch_size=2"]
        cfg = load_config(RMConfig, None, [*base, f"output_dir={tmp_path / f'e{i}'}"])
        with pytest.raises(DataError, match=msg) as e:
            train_reward_model(cfg)
        assert f"bad{i}.jsonl:2" in str(e.value)
        cfg = load_config(RMConfig, None, [*base, f"output_dir={tmp_path / f's{i}'}",
                                           "on_bad_row=skip"])
        train_reward_model(cfg)
        stats = read_metrics(tmp_path / f"s{i}" / "metrics.jsonl")[0]
        assert stats["data/skipped_rows"] == 1 and stats["data/pairs"] == 2
