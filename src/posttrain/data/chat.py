"""Chat templates and per-token assistant loss masks."""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from posttrain.errors import DataError

logger = logging.getLogger("posttrain")

# ChatML, as used by Qwen and SmolLM2. Used when a tokenizer ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Rendered to find the end-of-turn token; any short, template-neutral text works.
_PROBE = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "X"}]

Message = Mapping[str, Any]


@dataclass
class Encoded:
    """One tokenised example.

    ``loss_mask[t] == 1`` means token ``t`` is a training target (it is predicted from the
    tokens before it). ``loss_mask[0]`` is always 0: nothing predicts a sequence's first
    token, which is what lets sequences be packed end to end.
    """

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a template-less (base model) tokenizer the ChatML template.

    Adds ``<|im_start|>``/``<|im_end|>`` as special tokens when the vocabulary lacks them and
    returns True in that case: the caller must then grow the model's embeddings, e.g.
    ``model.resize_token_embeddings(len(tokenizer))``. Returns False when nothing was added.
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in ("<|im_start|>", "<|im_end|>") if tok not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    logger.info(
        "tokenizer had no chat template: using ChatML%s",
        f" and added special tokens {missing} (resize the model's embeddings)" if missing else "",
    )
    return bool(missing)


# --- rendering and tokenising ------------------------------------------------------------


def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except (TemplateError, ValueError) as e:
        raise DataError(f"the chat template could not render the conversation: {e}") from None
    return str(text)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tokenize_with_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the character offset where each token starts."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(
            "assistant loss masks need a fast tokenizer (one with offset mappings); "
            f"{type(tokenizer).__name__} has none"
        ) from None
    return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token, including added ones outside the named slots (e.g. im_end)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before plain text on its own (BOS for Llama, nothing for Qwen)."""
    bare = _tokenize(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k]
    return []


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _finish(ids: list[int], mask: list[int], max_length: int | None) -> Encoded:
    if mask:
        mask[0] = 0  # Nothing predicts the first token; packing relies on it.
    if max_length is not None and len(ids) > max_length:
        return Encoded(ids[:max_length], mask[:max_length], truncated=True)
    return Encoded(ids, mask)


# --- assistant masks ---------------------------------------------------------------------


def encode_messages(
    tokenizer: Any, messages: Sequence[Message], max_length: int | None = None
) -> Encoded:
    """Tokenise a conversation with the tokenizer's own template; targets = assistant turns.

    Each assistant turn contributes its content and its end-of-turn token (e.g.
    ``answer<|im_end|>``); the template's assistant header, and all system, user and tool
    turns, are context only. See ``docs/data.md`` for how the turns are located.
    """
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return _encode_conversation(tokenizer, messages, targets, max_length)


def _encode_conversation(
    tokenizer: Any, messages: Sequence[Message], targets: list[int], max_length: int | None
) -> Encoded:
    if GENERATION_MARKER.search(tokenizer.chat_template or ""):
        ids, mask = _mask_from_markers(tokenizer, messages, targets)
    else:
        ids, mask = _mask_from_spans(tokenizer, messages, targets)
    return _finish(ids, mask, max_length)


def _mask_from_markers(
    tokenizer: Any, messages: Sequence[Message], targets: list[int]
) -> tuple[list[int], list[int]]:
    """The template marks assistant text itself with ``{% generation %}``: trust it."""
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    # The markers cover every assistant turn; those before the first target (few-shot
    # examples inside a prompt) are context.
    first = targets[0] if targets else len(messages)
    if any(m["role"] == "assistant" for m in messages[:first]):
        n = len(_tokenize(tokenizer, _render(tokenizer, messages[:first], True)))
        mask[:n] = [0] * min(n, len(mask))
    return ids, mask


def _mask_from_spans(
    tokenizer: Any, messages: Sequence[Message], targets: list[int]
) -> tuple[list[int], list[int]]:
    """Find each target turn's characters by rendering the conversation progressively."""
    full = _render(tokenizer, messages)
    ids, starts = _tokenize_with_starts(tokenizer, full)
    special = special_token_ids(tokenizer)
    mask = [0] * len(ids)
    for i in targets:
        lo, hi = _turn_span(tokenizer, messages, i, full)
        turn = range(bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi))
        for k in _through_last_special(turn, ids, special):
            mask[k] = 1
    return ids, mask


def _turn_span(tokenizer: Any, messages: Sequence[Message], i: int, full: str) -> tuple[int, int]:
    """Characters of turn ``i`` after its header: [end of the generation prompt, end of turn)."""
    try:
        through = _render(tokenizer, messages[: i + 1])
        if i == 0:
            # transformers refuses to render an empty conversation, so an opening assistant
            # turn's header ends where its content is found.
            at = through.find(messages[0]["content"].strip())
            prefix = through[: max(at, 0)]
        else:
            prefix = _render(tokenizer, messages[:i], generation_prompt=True)
    except DataError:
        prefix = through = "\0"  # reported below as not prefix-stable
    if not (full.startswith(prefix) and full.startswith(through) and len(through) > len(prefix)):
        raise DataError(
            f"the chat template is not prefix-stable at message {i} (rendering the conversation "
            "up to an assistant turn does not give a prefix of the whole rendering, e.g. it "
            "rewrites earlier turns), so assistant tokens cannot be located; use a template "
            "with {% generation %} ... {% endgeneration %} markers around assistant content"
        )
    return len(prefix), len(through)


def _through_last_special(turn: range, ids: list[int], special: set[int]) -> range:
    # Drops what the template writes after the end-of-turn token (ChatML's "\n"): the model
    # should learn to stop, not to emit the separator that the next header starts with.
    for k in reversed(turn):
        if ids[k] in special:
            return range(turn.start, k + 1)
    return turn


# --- other row formats -------------------------------------------------------------------


def encode_prompt_completion(
    tokenizer: Any,
    prompt: str | Sequence[Message],
    completion: str | Sequence[Message],
    max_length: int | None = None,
) -> Encoded:
    """Targets = the completion only.

    Strings are concatenated without a template: ``[BOS] prompt completion EOS`` (BOS only
    if the tokenizer adds one), the completion and EOS being targets. Message lists are
    rendered as one conversation and the completion's assistant turns are targets.
    """
    if isinstance(prompt, str) and isinstance(completion, str):
        head = _leading_special_ids(tokenizer) + _tokenize(tokenizer, prompt)
        tail = _tokenize(tokenizer, completion) + _eos(tokenizer)
        return _finish(head + tail, [0] * len(head) + [1] * len(tail), max_length)
    if isinstance(prompt, str) or isinstance(completion, str):
        raise DataError("prompt and completion must both be strings or both be message lists")
    messages = [*prompt, *completion]
    targets = [i for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"]
    return _encode_conversation(tokenizer, messages, targets, max_length)


def encode_text(tokenizer: Any, text: str, max_length: int | None = None) -> Encoded:
    """Plain language modelling: ``[BOS] text EOS``, every token but the first is a target."""
    ids = _leading_special_ids(tokenizer) + _tokenize(tokenizer, text) + _eos(tokenizer)
    return _finish(ids, [1] * len(ids), max_length)


def encode_preference(
    tokenizer: Any, row: Mapping[str, Any], max_length: int | None = None
) -> tuple[Encoded, Encoded]:
    """(chosen, rejected) of a validated preference row, each as prompt + response."""
    chosen = encode_prompt_completion(tokenizer, row["prompt"], row["chosen"], max_length)
    rejected = encode_prompt_completion(tokenizer, row["prompt"], row["rejected"], max_length)
    return chosen, rejected


def encode_row(
    tokenizer: Any, row: Mapping[str, Any], fmt: str, max_length: int | None = None
) -> Encoded:
    """Encode a validated ``text`` / ``messages`` / ``prompt_completion`` / ``unpaired`` row."""
    if fmt == "text":
        return encode_text(tokenizer, row["text"], max_length)
    if fmt == "messages":
        return encode_messages(tokenizer, row["messages"], max_length)
    if fmt in ("prompt_completion", "unpaired"):
        return encode_prompt_completion(tokenizer, row["prompt"], row["completion"], max_length)
    hint = "; use encode_preference" if fmt == "preference" else ""
    raise ValueError(f"encode_row cannot encode format {fmt!r}{hint}")


# --- generation helpers ------------------------------------------------------------------


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token that closes an assistant turn in this template (None if none does)."""
    full = _render(tokenizer, _PROBE)
    prefix = _render(tokenizer, _PROBE[:1], generation_prompt=True)
    content_at = full.find("X", len(prefix) if full.startswith(prefix) else 0)
    if content_at < 0:
        return None
    ids, starts = _tokenize_with_starts(tokenizer, full)
    special = special_token_ids(tokenizer)
    return next(
        (t for t, s in zip(ids, starts, strict=True) if s > content_at and t in special), None
    )


def render_prompt(tokenizer: Any, prompt: str | Sequence[Message]) -> list[int]:
    """Token ids to generate from: a chat prompt ends with the assistant generation prompt;
    a string prompt is tokenised as is (after BOS, if the tokenizer adds one)."""
    if isinstance(prompt, str):
        return _leading_special_ids(tokenizer) + _tokenize(tokenizer, prompt)
    return _tokenize(tokenizer, _render(tokenizer, prompt, generation_prompt=True))


def last_text(value: str | Sequence[Message]) -> str:
    """A prompt's or completion's text: the string itself, or its last message's content."""
    return value if isinstance(value, str) else str(value[-1]["content"])
