"""Row schemas: the TRL / HF-hub conventions users already have.

| format              | required keys                          | used by                     |
|---------------------|----------------------------------------|-----------------------------|
| `text`              | `text`                                 | continued pre-training, SFT |
| `messages`          | `messages`                             | SFT                         |
| `prompt_completion` | `prompt`, `completion`                 | SFT                         |
| `preference`        | `chosen`, `rejected` (+ `prompt`, `margin`) | reward model, DPO family |
| `unpaired`          | `prompt`, `completion`, `label`        | KTO-style methods           |
| `prompt_only`       | `prompt` (+ any extra columns)         | online RL (PPO, GRPO)       |

Prompts and completions are either both strings or both message lists. Extra columns are
always kept (reward functions receive them, e.g. `answer`, `tests`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from posttrain.errors import DataError

FORMATS: tuple[str, ...] = (
    "text",
    "messages",
    "prompt_completion",
    "preference",
    "unpaired",
    "prompt_only",
)

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    # The prompt may be implicit: the shared leading turns of chosen and rejected.
    "preference": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_only": ("prompt",),
}

# Most specific first: a preference row also carries a prompt, an unpaired row also
# carries a prompt and a completion, so the first match is the one the user meant.
_DETECT_ORDER: tuple[str, ...] = (
    "preference",
    "unpaired",
    "prompt_completion",
    "messages",
    "text",
    "prompt_only",
)


def matches(row: Mapping[str, Any], fmt: str) -> bool:
    """Whether ``row`` has every key that format ``fmt`` needs (extra keys are fine)."""
    return all(key in row and row[key] is not None for key in REQUIRED_KEYS[fmt])


def detect_format(row: Mapping[str, Any], where: str = "row") -> str:
    """The most specific format whose required keys ``row`` has; DataError if none."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object (a row), got {type(row).__name__}")
    for fmt in _DETECT_ORDER:
        if matches(row, fmt):
            return fmt
    raise DataError(
        f"{where}: cannot tell the row format from its keys {sorted(row)}; expected one of "
        + "; ".join(f"{fmt}: {', '.join(REQUIRED_KEYS[fmt])}" for fmt in FORMATS)
    )


def validate_row(row: Mapping[str, Any], fmt: str, where: str) -> dict[str, Any]:
    """Check ``row`` against format ``fmt`` and return it normalised.

    Normalisation is minimal: strings are kept byte for byte, extra columns are kept, a
    0/1 ``label`` becomes a bool, and a preference row without a prompt gets one extracted
    from the leading turns that ``chosen`` and ``rejected`` share (TRL's implicit prompt).
    ``where`` prefixes every error, e.g. ``"data/train.jsonl:17"`` or ``"my_ds[row 17]"``.
    """
    if fmt not in _VALIDATORS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object (a row), got {type(row).__name__}")
    for key in REQUIRED_KEYS[fmt]:
        if key not in row or row[key] is None:
            raise DataError(
                f"{where}: field '{key}': missing or null (format '{fmt}' needs "
                f"{', '.join(REQUIRED_KEYS[fmt])}; the row has {', '.join(sorted(row))})"
            )
    out = dict(row)
    _VALIDATORS[fmt](out, where)
    return out


# --- field checks -----------------------------------------------------------------------


def _fail(where: str, field: str, expected: str, got: Any) -> DataError:
    return DataError(f"{where}: field '{field}': expected {expected}, got {_show(got)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_str(value: Any, where: str, field: str) -> None:
    if not isinstance(value, str):
        raise _fail(where, field, "a string", value)
    if not value.strip():
        raise _fail(where, field, "a non-empty string", value)


def _check_messages(value: Any, where: str, field: str, roles: tuple[str, ...] = ROLES) -> None:
    if not isinstance(value, list) or not value:
        raise _fail(where, field, "a non-empty list of messages", value)
    for i, msg in enumerate(value):
        here = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise _fail(where, here, "a message object with 'role' and 'content'", msg)
        role = msg.get("role")
        if role not in roles:
            raise _fail(where, f"{here}.role", f"one of {'/'.join(roles)}", role)
        if not isinstance(msg.get("content"), str):
            raise _fail(where, f"{here}.content", "a string", msg.get("content"))


def _check_has_answer(value: list[Mapping[str, Any]], where: str, field: str) -> None:
    # A conversation without assistant text would train on nothing: an empty loss mask.
    if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        raise DataError(
            f"{where}: field '{field}': expected at least one assistant message with "
            "non-empty content, found none"
        )


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _check_prompt(value: Any, where: str) -> None:
    if _is_conversation(value):
        _check_messages(value, where, "prompt")
    else:
        _check_str(value, where, "prompt")


def _check_response(value: Any, where: str, field: str, conversational: bool) -> None:
    """A completion / chosen / rejected: a string, or assistant messages after a chat prompt."""
    if conversational:
        _check_messages(value, where, field, roles=("assistant",))
        _check_has_answer(value, where, field)
    elif _is_conversation(value):
        raise _fail(where, field, "a string (the prompt is a string)", value)
    else:
        _check_str(value, where, field)


# --- per-format validators (mutate the row copy in place) -------------------------------


def _validate_text(row: dict[str, Any], where: str) -> None:
    _check_str(row["text"], where, "text")


def _validate_messages(row: dict[str, Any], where: str) -> None:
    _check_messages(row["messages"], where, "messages")
    _check_has_answer(row["messages"], where, "messages")


def _validate_prompt_completion(row: dict[str, Any], where: str) -> None:
    _check_prompt(row["prompt"], where)
    _check_response(row["completion"], where, "completion", _is_conversation(row["prompt"]))


def _validate_preference(row: dict[str, Any], where: str) -> None:
    if row.get("prompt") is None:
        _extract_implicit_prompt(row, where)
    _check_prompt(row["prompt"], where)
    conversational = _is_conversation(row["prompt"])
    _check_response(row["chosen"], where, "chosen", conversational)
    _check_response(row["rejected"], where, "rejected", conversational)
    if row["chosen"] == row["rejected"]:
        raise DataError(
            f"{where}: field 'rejected': expected a response different from 'chosen', "
            "got the same one (the pair teaches nothing)"
        )
    margin = row.get("margin")
    if margin is None:
        row.pop("margin", None)  # Arrow fills absent columns with None.
    elif (
        isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin)
    ):
        raise _fail(where, "margin", "a finite number", margin)


def _extract_implicit_prompt(row: dict[str, Any], where: str) -> None:
    """Split full chosen/rejected conversations into a shared prompt and two responses."""
    chosen, rejected = row["chosen"], row["rejected"]
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not _is_conversation(value):
            raise DataError(
                f"{where}: field 'prompt': missing; an implicit prompt can only be taken from "
                f"message lists, but '{field}' is {type(value).__name__}"
            )
        _check_messages(value, where, field)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # The responses start at the first assistant turn after the shared part.
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    if n == 0:
        raise DataError(
            f"{where}: field 'prompt': missing, and 'chosen' and 'rejected' share no leading "
            "non-assistant messages to use as the prompt"
        )
    row["prompt"], row["chosen"], row["rejected"] = chosen[:n], chosen[n:], rejected[n:]


def _validate_unpaired(row: dict[str, Any], where: str) -> None:
    _validate_prompt_completion(row, where)
    label = row["label"]
    if isinstance(label, bool):
        return
    if isinstance(label, int) and label in (0, 1):
        row["label"] = bool(label)
        return
    raise _fail(where, "label", "a bool (true = desirable completion) or 0/1", label)


def _validate_prompt_only(row: dict[str, Any], where: str) -> None:
    _check_prompt(row["prompt"], where)


_VALIDATORS = {
    "text": _validate_text,
    "messages": _validate_messages,
    "prompt_completion": _validate_prompt_completion,
    "preference": _validate_preference,
    "unpaired": _validate_unpaired,
    "prompt_only": _validate_prompt_only,
}
