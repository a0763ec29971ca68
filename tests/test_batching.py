"""Packing, padding and batch plans; packed == padded on a real (tiny) Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.data.batching import IGNORE_INDEX, move_batch, pack, pad, shifted_labels
from posttrain.data.chat import Encoded, encode_messages
from posttrain.models.tiny import build_model, build_tokenizer

PAD_ID = 3


def _inputs(batch: dict) -> dict:
    """An HF forward's kwargs: labels are already shifted, so they must not go in."""
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch} | {"use_cache": False}


def examples() -> list[Encoded]:
    # Different lengths and masks, including a target right after a context-only token.
    return [
        Encoded([10, 11, 12, 13, 14], [0, 0, 1, 1, 1]),
        Encoded([20, 21, 22], [0, 1, 1]),
        Encoded([30, 31, 32, 33, 34, 35, 36, 37], [0, 0, 0, 1, 0, 1, 1, 1]),
        Encoded([40, 41], [0, 1]),
    ]


def test_shifted_labels_by_hand() -> None:
    # labels[t] = ids[t+1] where mask[t+1] == 1, and the last position predicts nothing.
    assert shifted_labels([5, 6, 7, 8], [0, 0, 1, 1]) == [IGNORE_INDEX, 7, 8, IGNORE_INDEX]


def test_pack_layout() -> None:
    b = pack(examples()[:2])
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    # The last token of the first sequence must not be trained to predict the next one's start.
    assert b["labels"].tolist() == [[-100, 12, 13, 14, -100, 21, 22, -100]]
    assert b["sequence_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert (b["num_sequences"], b["num_tokens"], b["num_target_tokens"]) == (2, 8, 5)
    assert "attention_mask" not in b
    for key in ("input_ids", "position_ids", "labels"):
        assert b[key].dtype == torch.long and b[key].shape == (1, 8)


def test_pack_labels_never_cross_boundaries() -> None:
    exs = examples()
    b = pack(exs)
    ends = torch.tensor([len(e) for e in exs]).cumsum(0) - 1
    assert (b["labels"][0, ends] == IGNORE_INDEX).all()
    assert b["num_target_tokens"] == int((b["labels"] != IGNORE_INDEX).sum())


def test_pad_layout() -> None:
    b = pad(examples()[:2], PAD_ID, pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [
        [10, 11, 12, 13, 14, PAD_ID, PAD_ID, PAD_ID],
        [20, 21, 22, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
    ]
    assert b["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    assert b["labels"].tolist() == [
        [-100, 12, 13, 14, -100, -100, -100, -100],
        [21, 22, -100, -100, -100, -100, -100, -100],
    ]
    assert b["position_ids"].shape == (2, 8)
    assert (b["num_sequences"], b["num_tokens"], b["num_target_tokens"]) == (2, 8, 5)


def test_collate_rejects_empty() -> None:
    with pytest.raises(ValueError):
        pack([])
    with pytest.raises(ValueError):
        pad([Encoded([], [])], PAD_ID)


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Labels are already shifted: logits[t] is scored against labels[t].
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("nano", seed=0).eval().float()


def test_packed_equals_padded_loss(model: torch.nn.Module) -> None:
    exs = examples()
    packed, padded = pack(exs), pad(exs, PAD_ID)
    with torch.no_grad():
        loss_packed = summed_nll(model(**_inputs(packed)).logits, packed["labels"])
        loss_padded = summed_nll(model(**_inputs(padded)).logits, padded["labels"])
    assert packed["num_target_tokens"] == padded["num_target_tokens"]
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)


def test_packed_attention_stays_within_each_sequence(model: torch.nn.Module) -> None:
    exs = examples()
    with torch.no_grad():
        logits = model(**_inputs(pack(exs))).logits[0]  # (N, V)
        start = 0
        for ex in exs:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]  # (T, V)
            torch.testing.assert_close(logits[start : start + len(ex)], alone, atol=1e-5, rtol=0)
            start += len(ex)


def test_pack_real_conversation_targets_match_mask() -> None:
    tok = build_tokenizer()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    enc = encode_messages(tok, conv)
    labels = pack([enc, enc])["labels"][0]
    assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == "yo<|im_end|>" * 2


def test_move_batch_moves_every_field() -> None:
    """Tensors, objects with a ``to`` (a prefix layout), nested batches; ints stay ints."""
    from posttrain.models.prefix import pack_pairs

    ex = examples()
    batch = pack_pairs([ex[0], ex[0]])
    batch["kl_batch"] = pack(ex[:2])
    moved = move_batch(batch, "meta")
    assert moved["input_ids"].device.type == "meta"
    assert moved["prefix_layout"].cu_seq_lens.device.type == "meta"
    assert moved["kl_batch"]["input_ids"].device.type == "meta"
    assert moved["num_sequences"] == batch["num_sequences"] == 2
