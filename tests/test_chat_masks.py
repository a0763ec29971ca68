"""Assistant-only loss masks across chat templates, and the other row encodings."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from posttrain.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    Encoded,
    encode_messages,
    encode_preference,
    encode_prompt_completion,
    encode_row,
    encode_text,
    end_of_turn_token_id,
    ensure_chat_template,
    render_prompt,
)
from posttrain.errors import DataError
from posttrain.models.tiny import build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "SYSTEXT"},
    {"role": "user", "content": "question1"},
    {"role": "assistant", "content": "answer1"},
    {"role": "user", "content": "question2"},
    {"role": "assistant", "content": "answer2"},
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# SmolLM2-style: a default system prompt is injected when the conversation has none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are DEFAULTSYS.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Rewrites earlier assistant turns (as reasoning templates do with old thoughts).
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "<|im_start|>assistant\n[earlier]<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    t = build_tokenizer()
    t.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "extra_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    t.chat_template = LLAMA3_TEMPLATE
    return t


def with_template(template: str) -> PreTrainedTokenizerFast:
    t = build_tokenizer()
    t.chat_template = template
    return t


def targets(tokenizer: PreTrainedTokenizerFast, enc: Encoded) -> str:
    return tokenizer.decode([t for t, m in zip(enc.input_ids, enc.loss_mask, strict=True) if m])


def context(tokenizer: PreTrainedTokenizerFast, enc: Encoded) -> str:
    ids = [t for t, m in zip(enc.input_ids, enc.loss_mask, strict=True) if not m]
    return tokenizer.decode(ids)


def test_chatml_multi_turn_masks_exactly_assistant_content_and_end_token(
    tok: PreTrainedTokenizerFast,
) -> None:
    enc = encode_messages(tok, CONVERSATION)
    assert targets(tok, enc) == "answer1<|im_end|>answer2<|im_end|>"
    assert enc.loss_mask[0] == 0
    assert len(enc.loss_mask) == len(enc.input_ids)
    # Everything else, the assistant headers included, is context.
    ctx = context(tok, enc)
    for text in ("SYSTEXT", "question1", "question2", "<|im_start|>assistant\n"):
        assert text in ctx
    # The mask covers the whole rendering's assistant parts, in order, with nothing missing.
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(enc.input_ids) == full


def test_llama3_like_template_with_bos() -> None:
    t = llama3_tokenizer()
    enc = encode_messages(t, CONVERSATION)
    assert targets(t, enc) == "answer1<|eot_id|>answer2<|eot_id|>"
    assert enc.input_ids[0] == t.bos_token_id
    assert enc.loss_mask[0] == 0
    assert "<|end_header_id|>" not in targets(t, enc)
    assert end_of_turn_token_id(t) == t.convert_tokens_to_ids("<|eot_id|>")


def test_template_with_default_system_prompt() -> None:
    t = with_template(DEFAULT_SYSTEM_TEMPLATE)
    conv = CONVERSATION[1:]  # no system turn: the template injects one
    enc = encode_messages(t, conv)
    assert "DEFAULTSYS" in t.decode(enc.input_ids)
    assert targets(t, enc) == "answer1<|im_end|>answer2<|im_end|>"


def test_generation_markers_are_used_when_present() -> None:
    t = with_template(GENERATION_TEMPLATE)
    enc = encode_messages(t, CONVERSATION)
    assert targets(t, enc) == "answer1<|im_end|>answer2<|im_end|>"
    # Few-shot assistant turns inside a prompt stay context even though the markers cover them.
    pc = encode_prompt_completion(t, CONVERSATION[:4], CONVERSATION[4:])
    assert targets(t, pc) == "answer2<|im_end|>"


def test_template_that_is_not_prefix_stable_is_refused() -> None:
    t = with_template(UNSTABLE_TEMPLATE)
    with pytest.raises(DataError, match="generation"):
        encode_messages(t, CONVERSATION)


def test_prompt_completion_strings_target_completion_and_eos(tok: PreTrainedTokenizerFast) -> None:
    enc = encode_prompt_completion(tok, "2+2=", "4")
    assert tok.decode(enc.input_ids) == "2+2=4<|endoftext|>"
    assert enc.loss_mask == [0, 0, 0, 0, 1, 1]


def test_plain_strings_get_bos_when_tokenizer_adds_it(tok: PreTrainedTokenizerFast) -> None:
    t = llama3_tokenizer()
    # Make the tokenizer prepend BOS to plain text, as Llama tokenizers do.
    bos = t.bos_token_id
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    enc = encode_prompt_completion(t, "ab", "c")
    assert enc.input_ids == [bos, *tok("abc")["input_ids"], t.eos_token_id]
    assert enc.loss_mask == [0, 0, 0, 1, 1]
    assert encode_text(t, "ab").input_ids[0] == bos
    assert render_prompt(t, "ab")[0] == bos
    # Without such a post-processor nothing is prepended.
    assert encode_prompt_completion(tok, "ab", "c").input_ids[0] != bos


def test_prompt_completion_messages_target_only_completion_turns(
    tok: PreTrainedTokenizerFast,
) -> None:
    enc = encode_prompt_completion(tok, CONVERSATION[:4], CONVERSATION[4:])
    assert targets(tok, enc) == "answer2<|im_end|>"
    assert "answer1" in context(tok, enc)


def test_prompt_completion_mixed_types_rejected(tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match="both"):
        encode_prompt_completion(tok, "hi", [{"role": "assistant", "content": "x"}])


def test_text_rows_target_everything_but_the_first_token(tok: PreTrainedTokenizerFast) -> None:
    enc = encode_text(tok, "hello")
    assert tok.decode(enc.input_ids) == "hello<|endoftext|>"
    assert enc.loss_mask == [0, 1, 1, 1, 1, 1]


def test_truncation_is_flagged(tok: PreTrainedTokenizerFast) -> None:
    full = encode_messages(tok, CONVERSATION)
    cut = encode_messages(tok, CONVERSATION, max_length=20)
    assert cut.truncated and len(cut) == 20
    assert cut.input_ids == full.input_ids[:20]
    assert cut.loss_mask == full.loss_mask[:20]
    assert not encode_messages(tok, CONVERSATION, max_length=len(full)).truncated
    assert encode_text(tok, "hello world", max_length=4).truncated


def test_first_token_is_never_a_target_even_when_assistant_opens(
    tok: PreTrainedTokenizerFast,
) -> None:
    t = with_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    enc = encode_messages(t, [{"role": "assistant", "content": "hi"}])
    assert enc.loss_mask[0] == 0
    assert targets(t, enc) == "i<|im_end|>"


def test_end_of_turn_token_is_im_end(tok: PreTrainedTokenizerFast) -> None:
    assert end_of_turn_token_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_end_of_turn_token_none_without_special_end() -> None:
    t = with_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert end_of_turn_token_id(t) is None


def test_render_prompt_ends_with_generation_prompt(tok: PreTrainedTokenizerFast) -> None:
    ids = render_prompt(tok, CONVERSATION[:2])
    assert tok.decode(ids).endswith("question1<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(tok, "plain") == tok("plain")["input_ids"]


def test_encode_row_dispatch(tok: PreTrainedTokenizerFast) -> None:
    row = {"prompt": "a", "completion": "b", "label": True}
    assert encode_row(tok, row, "unpaired") == encode_prompt_completion(tok, "a", "b")
    assert encode_row(tok, {"text": "a"}, "text") == encode_text(tok, "a")
    with pytest.raises(ValueError, match="encode_preference"):
        encode_row(tok, {"prompt": "a", "chosen": "b", "rejected": "c"}, "preference")


def test_encode_preference_shares_the_prompt(tok: PreTrainedTokenizerFast) -> None:
    chosen, rejected = encode_preference(tok, {"prompt": "q", "chosen": "yes", "rejected": "no"})
    assert targets(tok, chosen) == "yes<|endoftext|>"
    assert targets(tok, rejected) == "no<|endoftext|>"


def _bare_byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<eos>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")


def test_ensure_chat_template_adds_chatml_and_tokens() -> None:
    t = _bare_byte_tokenizer()
    n = len(t)
    assert ensure_chat_template(t) is True
    assert t.chat_template == DEFAULT_CHAT_TEMPLATE
    assert len(t) == n + 2
    enc = encode_messages(t, CONVERSATION)
    assert targets(t, enc) == "answer1<|im_end|>answer2<|im_end|>"
    assert ensure_chat_template(t) is False  # already has one: untouched


def test_ensure_chat_template_keeps_existing_tokens() -> None:
    t = build_tokenizer()
    t.chat_template = None
    assert ensure_chat_template(t) is False
    assert t.chat_template == DEFAULT_CHAT_TEMPLATE
