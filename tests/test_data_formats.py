"""Row formats: detection by keys and validation with located, field-named errors."""

from __future__ import annotations

from typing import Any

import pytest

from posttrain.data.formats import FORMATS, detect_format, validate_row
from posttrain.errors import DataError

W = "data/train.jsonl:17"

USER = {"role": "user", "content": "q"}
ASSISTANT = {"role": "assistant", "content": "a"}

EXAMPLES: dict[str, dict[str, Any]] = {
    "text": {"text": "hello"},
    "messages": {"messages": [{"role": "system", "content": "s"}, USER, ASSISTANT]},
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "preference": {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 1.5},
    "unpaired": {"prompt": "q", "completion": "a", "label": False},
    "prompt_only": {"prompt": [USER], "answer": "42", "tests": ["assert f() == 1"]},
}


def test_every_format_has_an_example() -> None:
    assert set(EXAMPLES) == set(FORMATS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_and_validate_each_format(fmt: str) -> None:
    row = {**EXAMPLES[fmt], "source": "extra column"}
    assert detect_format(row) == fmt
    out = validate_row(row, fmt, W)
    assert out == row  # valid rows come back unchanged, extra columns included


def test_detect_unknown_keys_names_them() -> None:
    with pytest.raises(DataError, match=r"my.jsonl:3: .*\['foo', 'question'\]"):
        detect_format({"question": "q", "foo": 1}, "my.jsonl:3")


def test_non_object_row() -> None:
    with pytest.raises(DataError, match="expected a JSON object"):
        validate_row(["text"], "text", W)  # type: ignore[arg-type]


def bad(row: dict[str, Any], fmt: str, *fragments: str) -> None:
    with pytest.raises(DataError) as info:
        validate_row(row, fmt, W)
    message = str(info.value)
    assert message.startswith(W + ": ")
    for fragment in fragments:
        assert fragment in message, message


def test_bad_role_names_field_and_expected_values() -> None:
    row = {"messages": [USER, ASSISTANT, {"role": "bot", "content": "x"}]}
    bad(row, "messages", "field 'messages[2].role'", "system/user/assistant/tool", "'bot'")


def test_messages_need_an_assistant_answer() -> None:
    bad({"messages": [USER]}, "messages", "field 'messages'", "assistant")
    empty = {"role": "assistant", "content": "  "}
    bad({"messages": [USER, empty]}, "messages", "assistant")


def test_message_content_must_be_a_string() -> None:
    row = {"messages": [USER, {"role": "assistant", "content": None}]}
    bad(row, "messages", "field 'messages[1].content'", "a string")
    bad({"messages": []}, "messages", "field 'messages'", "non-empty list")
    bad({"messages": ["hi"]}, "messages", "field 'messages[0]'")


def test_text_must_be_non_empty_string() -> None:
    bad({"text": ""}, "text", "field 'text'", "non-empty")
    bad({"text": 3}, "text", "field 'text'", "a string", "3")


def test_missing_field_is_named() -> None:
    bad({"prompt": "q"}, "prompt_completion", "field 'completion'", "missing")


def test_prompt_completion_types() -> None:
    bad({"prompt": "q", "completion": ""}, "prompt_completion", "field 'completion'")
    bad({"prompt": "q", "completion": [ASSISTANT]}, "prompt_completion", "field 'completion'")
    bad({"prompt": [USER], "completion": "a"}, "prompt_completion", "field 'completion'")
    bad({"prompt": [USER], "completion": [USER]}, "prompt_completion", "'completion[0].role'")
    row = {"prompt": [USER], "completion": [ASSISTANT]}
    assert validate_row(row, "prompt_completion", W) == row


def test_preference_checks() -> None:
    bad({"prompt": "q", "chosen": "a", "rejected": "a"}, "preference", "'rejected'", "different")
    bad({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "preference", "'margin'")
    bad({"prompt": "q", "chosen": "a", "rejected": "b", "margin": True}, "preference", "'margin'")
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "margin": None}
    assert "margin" not in validate_row(row, "preference", W)


def test_preference_implicit_prompt_is_extracted() -> None:
    sys = {"role": "system", "content": "s"}
    good, worse = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}
    row = {"chosen": [sys, USER, good], "rejected": [sys, USER, worse]}
    assert detect_format(row) == "preference"
    out = validate_row(row, "preference", W)
    assert out["prompt"] == [sys, USER]
    assert out["chosen"] == [good] and out["rejected"] == [worse]
    bad({"chosen": "a", "rejected": "b"}, "preference", "field 'prompt'")
    bad({"chosen": [good], "rejected": [worse]}, "preference", "field 'prompt'")


def test_unpaired_label() -> None:
    assert (
        validate_row({"prompt": "q", "completion": "a", "label": 1}, "unpaired", W)["label"] is True
    )
    assert (
        validate_row({"prompt": "q", "completion": "a", "label": 0}, "unpaired", W)["label"]
        is False
    )
    bad({"prompt": "q", "completion": "a", "label": "yes"}, "unpaired", "field 'label'", "bool")
    bad({"prompt": "q", "completion": "a", "label": 2}, "unpaired", "field 'label'")


def test_prompt_only_keeps_extra_columns_and_checks_prompt() -> None:
    assert validate_row({"prompt": "q", "answer": 3}, "prompt_only", W)["answer"] == 3
    bad({"prompt": ""}, "prompt_only", "field 'prompt'")
    bad({"prompt": [{"role": "user"}]}, "prompt_only", "field 'prompt[0].content'")


def test_detect_prefers_most_specific() -> None:
    assert detect_format({"prompt": "q", "completion": "a", "label": True}) == "unpaired"
    assert detect_format({"prompt": "q", "completion": "a"}) == "prompt_completion"
    assert detect_format({"prompt": "q", "answer": "a"}) == "prompt_only"


def test_unknown_format_name() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        validate_row({"text": "a"}, "chat", W)
