"""Loading rows from files, saved datasets, built-in tasks and (offline) hub names."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datasets
import pytest

from posttrain.data.sources import Rows, load_rows, parse_task_spec
from posttrain.errors import DataError
from posttrain.tasks.registry import register_task

CONV = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
PC_ROWS = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(4)]


@register_task("_test_sources_echo", "test-only: echoes its parameters into rows")
def _echo_task(split: str, size: int | None, seed: int, **params: Any) -> list[dict[str, Any]]:
    n = 3 if size is None else size
    return [
        {"prompt": f"{split}-{seed}-{i}", "params": json.dumps(params, sort_keys=True)}
        for i in range(n)
    ]


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# --- jsonl -------------------------------------------------------------------------------


def test_jsonl_loads_and_detects(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"messages": CONV, "id": 1}, "", {"messages": CONV}]
    )
    rows = load_rows(str(path))
    assert isinstance(rows, Rows)
    assert (rows.format, len(rows), rows.skipped, rows.source) == ("messages", 2, 0, str(path))
    assert rows.rows[0]["id"] == 1


def test_jsonl_bad_row_names_file_line_and_field(tmp_path: Path) -> None:
    bad = {"messages": [CONV[0], {"role": "bot", "content": "x"}]}
    # Line 3 is blank: line numbers must still be counted from the file, 1-based.
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CONV}, {"messages": CONV}, "", bad])
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    message = str(info.value)
    assert f"{path}:4:" in message
    assert "messages[1].role" in message and "'bot'" in message


def test_jsonl_invalid_json_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, '{"text": "b",'])
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        load_rows(str(path))


def test_skip_mode_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [
        {"text": ""},  # bad before the format is known: still just a bad row
        {"text": "a"},
        "not json",
        {"messages": CONV},  # another format
        {"text": "b", "extra": 1},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        rows = load_rows(str(path), on_bad_row="skip")
    assert rows.format == "text"
    assert [r["text"] for r in rows.rows] == ["a", "b"]
    assert rows.skipped == 3
    assert "skipped 3 bad row(s) of 5" in caplog.text
    assert f"{path}:1: field 'text'" in caplog.text  # the first error is reported
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'text'"):
        load_rows(str(path))


def test_mixed_formats_are_bad_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"messages": CONV}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a row in format 'text'"):
        load_rows(str(path))


def test_all_bad_rows_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": 5}])
    with pytest.raises(DataError, match="all 2 rows are bad"):
        load_rows(str(path), on_bad_row="skip")


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(str(path))


# --- accepted formats ----------------------------------------------------------------------


def test_format_not_accepted_names_formats_and_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as info:
            load_rows(str(path), formats=("preference",), on_bad_row=mode)  # type: ignore[arg-type]
        message = str(info.value)
        assert "'preference'" in message and "chosen, rejected" in message
        assert "keys text" in message


def test_first_accepted_format_wins(tmp_path: Path) -> None:
    pref = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [pref])
    assert load_rows(str(path)).format == "preference"
    # An online-RL recipe can use the prompts of preference data.
    assert load_rows(str(path), formats=("prompt_only",)).format == "prompt_only"


def test_unknown_format_name_in_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="unknown formats"):
        load_rows(str(path), formats=("chat",))


# --- other files -----------------------------------------------------------------------------


def test_json_array_and_json_lines(tmp_path: Path) -> None:
    array = tmp_path / "a.json"
    array.write_text(json.dumps(PC_ROWS))
    assert load_rows(str(array)).rows == PC_ROWS
    lines = write_jsonl(tmp_path / "l.json", PC_ROWS)
    assert load_rows(str(lines)).rows == PC_ROWS
    array.write_text(json.dumps([*PC_ROWS, {"prompt": "q", "completion": ""}]))
    with pytest.raises(DataError, match=r"a\.json\[row 4\]: field 'completion'"):
        load_rows(str(array))


def test_csv_and_parquet(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_list(PC_ROWS)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.csv", "d.parquet"):
        rows = load_rows(str(tmp_path / name))
        assert rows.format == "prompt_completion"
        assert rows.rows == PC_ROWS


def test_csv_bad_rows_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    # Row 1 spans lines 2-3 (a quoted newline), so the empty completion is on line 4.
    path.write_text('prompt,completion\nq,"a\nb"\nq2,\nq3,c,surplus\n')
    with pytest.raises(DataError, match=r"d\.csv:4: field 'completion'.*non-empty"):
        load_rows(str(path))
    rows = load_rows(str(path), on_bad_row="skip")
    assert rows.rows == [{"prompt": "q", "completion": "a\nb"}] and rows.skipped == 2


def test_csv_reads_label_and_margin(tmp_path: Path) -> None:
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label\nq,a,true\nq,b,0\n")
    assert [r["label"] for r in load_rows(str(path)).rows] == [True, False]
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected,margin\nq,a,b,1.5\nq,a,b,\n")
    rows = load_rows(str(path)).rows
    assert rows[0]["margin"] == 1.5 and "margin" not in rows[1]


def test_parquet_keeps_message_lists_without_arrow_nulls(tmp_path: Path) -> None:
    # One message with an extra key makes Arrow give every message that key, as None.
    tagged = [CONV[0], {**CONV[1], "name": "bot"}]
    ds = datasets.Dataset.from_list([{"messages": CONV}, {"messages": tagged}])
    ds.to_parquet(str(tmp_path / "m.parquet"))
    rows = load_rows(str(tmp_path / "m.parquet"))
    assert rows.format == "messages"
    assert [r["messages"] for r in rows.rows] == [CONV, tagged]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    datasets.Dataset.from_list(PC_ROWS).save_to_disk(str(tmp_path / "one"))
    assert load_rows(str(tmp_path / "one")).rows == PC_ROWS
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(PC_ROWS),
        test=datasets.Dataset.from_list(PC_ROWS[:1]),
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_rows(str(tmp_path / "dict"), split="test")) == 1
    with pytest.raises(DataError, match="no split 'validation'; available splits: test, train"):
        load_rows(str(tmp_path / "dict"), split="validation")


def test_plain_directory_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a dataset written by save_to_disk"):
        load_rows(str(tmp_path))


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        load_rows("data/missing.parquet")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(tmp_path / "d.txt"))


# --- tasks -----------------------------------------------------------------------------------


def test_parse_task_spec() -> None:
    assert parse_task_spec("task:arithmetic") == ("arithmetic", {})
    name, params = parse_task_spec("task:arithmetic:size=500,seed=3,p=0.5,hard=true,op=add")
    assert name == "arithmetic"
    assert params == {"size": 500, "seed": 3, "p": 0.5, "hard": True, "op": "add"}
    with pytest.raises(DataError, match="key=value"):
        parse_task_spec("task:arithmetic:size")


def test_task_rows_with_params_and_split_override() -> None:
    rows = load_rows("task:_test_sources_echo:size=2,seed=5,level=hard,split=test", split="train")
    assert rows.format == "prompt_only"
    assert [r["prompt"] for r in rows.rows] == ["test-5-0", "test-5-1"]
    assert json.loads(rows.rows[0]["params"]) == {"level": "hard"}
    assert load_rows("task:_test_sources_echo", split="eval").rows[0]["prompt"] == "eval-0-0"


def test_unknown_task() -> None:
    with pytest.raises(DataError, match="unknown task"):
        load_rows("task:_no_such_task_here")


# --- hub -------------------------------------------------------------------------------------


def test_hub_name_offline_gives_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # datasets reads the variables at import time, which has already happened.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_rows("some-org/surely-not-a-local-dataset")
    message = str(info.value)
    assert "no such local file" in message and "Hub" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
