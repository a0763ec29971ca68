"""Load validated rows from a file, a saved dataset, a built-in task or the HF hub.

``load_rows(spec)`` accepts:

- ``path/to/file.jsonl`` (one JSON object per line; errors name ``file:LINE``),
- ``file.json`` (a JSON array of rows, or JSON lines), ``file.parquet``,
- ``file.csv`` (cells are strings; ``label`` and ``margin`` are read as bool/number),
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
- ``task:NAME`` or ``task:NAME:key=value,key=value`` (a built-in generated task),
- anything else is tried as a hub dataset name (``datasets.load_dataset(name, split=split)``),
- a list of these (a mixture, ``data/mixture.py``): their rows, in one format, concatenated.

Every row is validated; a bad row raises a DataError naming where it is and which field is
wrong, or, with ``on_bad_row="skip"``, is dropped and counted in ``Rows.skipped``. Text that
is not valid UTF-8 (a stray Latin-1 byte, a lone surrogate) makes its row a bad row too.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.data.formats import FORMATS, REQUIRED_KEYS, detect_format, matches, validate_row
from posttrain.data.mixture import DataSpec, Part, describe, log_counts, parse_mixture, weighted
from posttrain.errors import DataError

logger = logging.getLogger("posttrain")

FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet", ".csv")

# (where, row) pairs: ``where`` is what an error message prints, e.g. "train.jsonl:17".
Located = Iterator[tuple[str, Any]]


@dataclass
class Rows:
    """Validated rows that all share one ``format``, plus how many bad rows were skipped."""

    rows: list[dict[str, Any]]
    format: str
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.rows)


def load_rows(
    spec: DataSpec,
    *,
    split: str = "train",
    formats: Collection[str] | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> Rows:
    """Load and validate the rows of ``spec`` (see the module docstring for what it can be).

    ``formats`` lists the formats the caller accepts, in order of preference; a row that
    carries the keys of several (a preference row also has a prompt) takes the first.
    ``on_bad_row="skip"`` drops bad rows, counts them and logs one warning. A mixture's
    sources must all end up in the same format.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if formats is not None:
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown formats {unknown}; choose from {FORMATS}")
    if not isinstance(spec, str):
        loaded = load_sources(spec, split=split, formats=formats, on_bad_row=on_bad_row)
        return _concatenated(spec, loaded, split)
    return _validate_all(spec, _locate(spec, split), formats, on_bad_row)


def load_sources(
    spec: DataSpec,
    *,
    split: str = "train",
    formats: Collection[str] | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> list[tuple[Part, Rows]]:
    """Each source of ``spec`` loaded on its own, its rows weighted by its ``times``."""
    loaded = []
    for part in parse_mixture(spec):
        rows = load_rows(part.source, split=split, formats=formats, on_bad_row=on_bad_row)
        loaded.append((part, dataclasses.replace(rows, rows=weighted(rows.rows, part))))
    return loaded


def _concatenated(spec: DataSpec, loaded: list[tuple[Part, Rows]], split: str) -> Rows:
    first_part, first = loaded[0]
    for part, rows in loaded[1:]:
        if rows.format != first.format:
            raise DataError(
                f"{part.source}: rows in format '{rows.format}', but the mixture's first "
                f"source {first_part.source} has rows in format '{first.format}'; all sources "
                "of a mixture must be in one format"
            )
    log_counts([(part, len(rows)) for part, rows in loaded], split)
    return Rows(
        rows=[row for _, rows in loaded for row in rows.rows],
        format=first.format,
        source=describe(spec),
        skipped=sum(rows.skipped for _, rows in loaded),
    )


# --- validation -------------------------------------------------------------------------


def _validate_all(
    spec: str, located: Located, formats: Collection[str] | None, on_bad_row: str
) -> Rows:
    rows: list[dict[str, Any]] = []
    fmt: str | None = None
    skipped, first_error = 0, ""
    for where, raw in located:
        try:
            if isinstance(raw, _Unreadable):
                raise DataError(raw.error)
            _check_text(raw, where)
            if fmt is None:
                # Decided by the first valid row; bad rows before it are just bad rows.
                candidate = _choose_format(raw, formats, where)
                rows.append(validate_row(raw, candidate, where))
                fmt = candidate
            else:
                rows.append(_validate_same_format(raw, fmt, where))
        except DataError as e:
            if on_bad_row == "error" or isinstance(e, _FormatNotAccepted):
                raise
            skipped += 1
            first_error = first_error or str(e)
    return _finish(spec, rows, fmt, skipped, first_error)


def _finish(
    spec: str, rows: list[dict[str, Any]], fmt: str | None, skipped: int, first_error: str
) -> Rows:
    if not rows and not skipped:
        raise DataError(f"{spec}: the data source has no rows")
    if not rows:
        raise DataError(f"{spec}: all {skipped} rows are bad; the first error was: {first_error}")
    if skipped:
        logger.warning(
            "%s: skipped %d bad row(s) of %d; the first error was: %s",
            spec,
            skipped,
            skipped + len(rows),
            first_error,
        )
    assert fmt is not None  # rows is non-empty, so a format was chosen
    return Rows(rows=rows, format=fmt, source=spec, skipped=skipped)


class _FormatNotAccepted(DataError):
    """The data is well-formed but in a format the caller cannot use: never skippable."""


def _choose_format(row: Any, formats: Collection[str] | None, where: str) -> str:
    detected = detect_format(row, where)
    if formats is None:
        return detected
    for fmt in formats:
        if matches(row, fmt):
            return fmt
    raise _FormatNotAccepted(
        f"{where}: this command accepts rows in format(s) "
        + "; ".join(f"'{f}' (keys: {', '.join(REQUIRED_KEYS[f])})" for f in formats)
        + f", but the data has keys {', '.join(sorted(row))} (format '{detected}')"
    )


# Lone surrogates: what undecodable bytes become under "surrogateescape", or what a JSON
# "\\udce9" escape gives. No tokenizer can encode them, so they are bad text, not a crash later.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_surrogate(v) for v in value)
    return False


def _check_text(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        return
    for key, value in row.items():
        if _has_surrogate(key) or _has_surrogate(value):
            # backslashreplace: the message itself must be printable as UTF-8.
            shown = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
            raise DataError(f"{where}: field '{shown}': not valid UTF-8 (a lone surrogate)")


def _validate_same_format(row: Any, fmt: str, where: str) -> dict[str, Any]:
    # A key present but null is the row's problem (validate_row names it); absent keys
    # mean the row is in another format than the rows before it.
    if isinstance(row, dict) and not all(key in row for key in REQUIRED_KEYS[fmt]):
        raise DataError(
            f"{where}: expected a row in format '{fmt}' like the rows before it (keys: "
            f"{', '.join(REQUIRED_KEYS[fmt])}), got keys {', '.join(sorted(row)) or 'none'}"
        )
    return validate_row(row, fmt, where)


# --- where rows come from ---------------------------------------------------------------


def _locate(spec: str, split: str) -> Located:
    if spec.startswith("task:"):
        return _task_rows(spec, split)
    path = Path(spec).expanduser()
    if spec.startswith("[") and spec.endswith("]") and not path.exists():
        # A mixture typed for an option that takes one source (redteam, eval).
        raise DataError(f"{spec}: a list of sources, where this option takes one source")
    if path.is_dir():
        return _disk_rows(path, split)
    if path.is_file():
        return _file_rows(path)
    if _looks_like_path(spec):
        raise DataError(f"{spec}: no such file or directory")
    return _hub_rows(spec, split)


def _looks_like_path(spec: str) -> bool:
    # "org/name" is a hub id, so one slash alone does not make a path.
    return (
        spec.endswith(FILE_SUFFIXES)
        or spec.startswith(("/", "./", "../", "~"))
        or "\\" in spec
        or spec.count("/") > 1
    )


def _file_rows(path: Path) -> Located:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path, _read_text(path))
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".csv":
        return _csv_rows(path)
    raise DataError(
        f"{path}: unsupported file type '{suffix}'; expected one of {', '.join(FILE_SUFFIXES)}"
    )


@dataclass
class _Unreadable:
    """A row that could not even be parsed; it fails validation like any other bad row."""

    error: str


# What "surrogateescape" decodes each byte that is not UTF-8 to: U+DC80..U+DCFF.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _read_text(path: Path) -> str:
    """The file as text; bytes that are not UTF-8 are kept as escapes, so that only the rows
    holding them fail (and can be skipped) instead of the whole file."""
    return path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _jsonl_rows(path: Path, text: str) -> Located:
    # Split on "\n" only: str.splitlines would also split inside rows at U+2028, U+0085...
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        yield f"{path}:{lineno}", _jsonl_row(line, f"{path}:{lineno}")


def _jsonl_row(line: str, where: str) -> Any:
    if _ESCAPED_BYTE.search(line):
        return _Unreadable(f"{where}: not valid UTF-8")
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return _Unreadable(f"{where}: invalid JSON ({e.msg} at column {e.colno})")


def _json_rows(path: Path) -> Located:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
            ) from None
        # Not one JSON document: JSON lines saved with a .json name (as pandas/HF write it).
        return _jsonl_rows(path, text)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    if _ESCAPED_BYTE.search(text):  # only then is it worth looking for them row by row
        data = [_not_utf8(row, f"{path}[row {i}]") for i, row in enumerate(data)]
    return ((f"{path}[row {i}]", row) for i, row in enumerate(data))


def _not_utf8(row: Any, where: str) -> Any:
    """``row``, or an unreadable row when it holds bytes that were not UTF-8 in the file."""
    shown = json.dumps(row, ensure_ascii=False)
    return _Unreadable(f"{where}: not valid UTF-8") if _ESCAPED_BYTE.search(shown) else row


def _parquet_rows(path: Path) -> Located:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # pyarrow raises many types; the user needs one line.
        raise DataError(f"{path}: could not read the parquet file ({_first_line(e)})") from None
    return _dataset_rows(str(path), ds)


def _csv_rows(path: Path) -> Located:
    # The csv module rather than pandas: cells stay the exact strings written (pandas would
    # turn a completion "4" into the int 4), and errors can name the line.
    # surrogateescape: a row with bytes that are not UTF-8 is one bad row, not a crash.
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if any(_ESCAPED_BYTE.search(name) for name in reader.fieldnames or ()):
            raise DataError(f"{path}:1: not valid UTF-8 (in the header)")
        start = 2  # line 1 is the header
        for row in reader:
            yield f"{path}:{start}", _csv_row(row, f"{path}:{start}")
            start = reader.line_num + 1


def _csv_row(row: dict[str, Any], where: str) -> Any:
    if None in row:  # DictReader files surplus cells under the key None
        return _Unreadable(f"{where}: more cells than the header has columns")
    if any(isinstance(v, str) and _ESCAPED_BYTE.search(v) for v in row.values()):
        return _Unreadable(f"{where}: not valid UTF-8")
    return _csv_typed(row)


def _csv_typed(row: dict[str, Any]) -> dict[str, Any]:
    """CSV has only strings: read the two non-string columns of the formats as bool/float."""
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in _CSV_BOOLS:
        row["label"] = _CSV_BOOLS[label.strip().lower()]
    margin = row.get("margin")
    if margin is not None and not margin.strip():
        del row["margin"]  # an empty optional cell means "no margin"
    elif margin is not None:
        with contextlib.suppress(ValueError):  # else left a string, which validation reports
            row["margin"] = float(margin)
    return row


_CSV_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _disk_rows(path: Path, split: str) -> Located:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path}: a directory, but not a dataset written by save_to_disk "
            "(expected dataset_info.json / dataset_dict.json inside)"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{path}: no split '{split}'; available splits: {', '.join(sorted(ds))}"
            )
        return _dataset_rows(f"{path}[{split}]", ds[split])
    return _dataset_rows(str(path), ds)


def _hub_rows(name: str, split: str) -> Located:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(name, split=split)
    except DatasetNotFoundError:
        raise DataError(
            f"{name}: no such local file or directory, and no dataset of that name on the "
            "Hugging Face Hub (or it is private/gated)"
        ) from None
    except ConnectionError as e:
        raise DataError(
            f"{name}: no such local file or directory, and the Hugging Face Hub could not be "
            f"reached to look for a dataset of that name ({_first_line(e)})"
        ) from None
    except Exception as e:  # bad split, bad config...: one clear line, not a deep traceback.
        raise DataError(
            f"{name}: could not load from the Hugging Face Hub ({_first_line(e)})"
        ) from None
    return _dataset_rows(f"{name}[{split}]", ds)


def _dataset_rows(label: str, ds: Any) -> Located:
    try:
        rows = ds.to_list()
    except UnicodeDecodeError:
        # Arrow strings should be UTF-8, but not every parquet writer checks: find the bad rows.
        return _dataset_rows_one_by_one(label, ds)
    return ((f"{label}[row {i}]", _drop_arrow_nulls(row)) for i, row in enumerate(rows))


def _dataset_rows_one_by_one(label: str, ds: Any) -> Located:
    for i in range(len(ds)):
        try:
            row: Any = _drop_arrow_nulls(ds[i])
        except UnicodeDecodeError:
            row = _Unreadable(f"{label}[row {i}]: not valid UTF-8")
        yield f"{label}[row {i}]", row


def _drop_arrow_nulls(row: dict[str, Any]) -> dict[str, Any]:
    """Remove the None keys Arrow adds to messages to unify their schema.

    One message with ``tool_calls`` gives every message ``tool_calls: None``, and templates
    that test ``'tool_calls' in message`` would then render tool calls that do not exist.
    """
    for key, value in row.items():
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            row[key] = [{k: v for k, v in m.items() if v is not None} for m in value]
    return row


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# --- built-in tasks ---------------------------------------------------------------------


def _task_rows(spec: str, split: str) -> Located:
    from posttrain.tasks.registry import build_task_rows

    name, params = parse_task_spec(spec)
    split = str(params.pop("split", split))
    rows = build_task_rows(name, split=split, **params)
    return ((f"task:{name}[{split} row {i}]", row) for i, row in enumerate(rows))


def parse_task_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"task:NAME:k=v,k=v"`` -> ``(NAME, {k: v})``; values parse as int/float/bool if they can."""
    body = spec.removeprefix("task:")
    name, _, args = body.partition(":")
    if not name:
        raise DataError(f"{spec}: expected 'task:NAME' or 'task:NAME:key=value,...'")
    params: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DataError(f"{spec}: expected 'key=value' in the task parameters, got '{item}'")
        params[key.strip()] = _parse_value(value.strip())
    return name, params


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
