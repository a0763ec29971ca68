"""Text that is not valid UTF-8 makes a bad row, named ``FILE:LINE: not valid UTF-8`` and
skippable with ``on_bad_row=skip``, in every data format the loaders read; ``posttrain chat``
refuses such a line on stdin with one line and keeps the session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.data.sources import load_rows
from posttrain.errors import DataError

GOOD = {"prompt": "2+2?", "completion": "4"}
BAD = b"caf\xe9"  # Latin-1 "cafe" with an accent: not UTF-8


def _jsonl(tmp: Path) -> tuple[Path, str]:
    path = tmp / "x.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(good + b'\n{"prompt": "' + BAD + b'", "completion": "a"}\n' + good + b"\n")
    return path, f"{path}:2: not valid UTF-8"


def _json_array(tmp: Path) -> tuple[Path, str]:
    path = tmp / "x.json"
    good = json.dumps(GOOD).encode()
    path.write_bytes(b"[" + good + b', {"prompt": "' + BAD + b'", "completion": "a"}]')
    return path, f"{path}[row 1]: not valid UTF-8"


def _json_lines(tmp: Path) -> tuple[Path, str]:
    path = tmp / "x.json"
    path.write_bytes(_jsonl(tmp)[0].read_bytes())
    return path, f"{path}:2: not valid UTF-8"


def _csv(tmp: Path) -> tuple[Path, str]:
    path = tmp / "x.csv"
    path.write_bytes(b"prompt,completion\n2+2?,4\n" + BAD + b",a\n3+3?,6\n")
    return path, f"{path}:3: not valid UTF-8"


def _arrow_table() -> object:
    import pyarrow as pa

    # pyarrow validates strings built from Python, so the bad bytes go in as raw buffers.
    data = b"2+2?" + BAD
    offsets = pa.array([0, 4, len(data)], pa.int32()).buffers()[1]
    prompts = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])
    return pa.table({"prompt": prompts, "completion": pa.array(["4", "a"])})


def _parquet(tmp: Path) -> tuple[Path, str]:
    import pyarrow.parquet as pq

    path = tmp / "x.parquet"
    pq.write_table(_arrow_table(), path)
    return path, f"{path}[row 1]: not valid UTF-8"


def _saved_dataset(tmp: Path) -> tuple[Path, str]:
    import datasets

    path = tmp / "saved"
    datasets.Dataset(_arrow_table()).save_to_disk(str(path))
    return path, f"{path}[row 1]: not valid UTF-8"


MAKERS: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "jsonl": _jsonl, "json": _json_array, "json_lines": _json_lines, "csv": _csv,
    "parquet": _parquet, "save_to_disk": _saved_dataset,
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_bad_bytes_are_a_bad_row_in_every_format(tmp_path: Path, kind: str) -> None:
    path, message = MAKERS[kind](tmp_path)
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(err.value) == message
    rows = load_rows(str(path), on_bad_row="skip")
    assert rows.skipped == 1
    assert rows.rows[0] == GOOD


def test_lone_surrogate_escape_is_bad_text(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"prompt": "\\udce9", "completion": "a"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: field 'prompt': not valid UTF-8"):
        load_rows(str(path))
    assert load_rows(str(path), on_bad_row="skip").skipped == 1


def test_sft_names_the_line_and_skips_it(tmp_path: Path, capsys) -> None:
    path = tmp_path / "x.jsonl"
    good = json.dumps({"text": "the cat sat on the mat"}).encode() + b"\n"
    path.write_bytes(b'{"text":"' + BAD + b'"}\n' + good * 3)
    args = ["sft", "model=tiny:nano", f"data={path}", "max_steps=1", "max_length=64"]
    assert main([*args, f"output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:1: not valid UTF-8" in err and "Traceback" not in err
    assert main([*args, f"output_dir={tmp_path / 'b'}", "on_bad_row=skip"]) == 0
    first = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data/skipped_rows"] == 1 and first["data/rows"] == 3


def test_chat_refuses_undecodable_stdin_and_keeps_the_session(nano_dir: Path) -> None:
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout, not an install
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "chat", str(nano_dir), "--max-new-tokens", "4",
         "--temperature", "0"],
        input=BAD + b"\nhello\n/exit\n", capture_output=True, env=env, timeout=300,
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "not valid" in err and "Traceback" not in err
    assert proc.stdout.decode().count("assistant>") == 1  # "hello" got its reply


def test_sandbox_program_bytes_decode_as_python_source(tmp_path: Path, capsys) -> None:
    from posttrain.sandbox.cli import _read

    latin = tmp_path / "latin.py"
    latin.write_bytes(b'# -*- coding: latin-1 -*-\nprint("caf\xe9")\n')
    assert 'caf\u00e9' in _read(str(latin))  # a coding cookie is honoured, as Python does
    bad = tmp_path / "bad.py"
    bad.write_bytes(b'print("caf\xe9")\n')
    assert main(["sandbox", "run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not valid Python source text" in err and "Traceback" not in err


def test_eval_code_sample_file_names_the_undecodable_line(tmp_path: Path, capsys) -> None:
    samples = tmp_path / "samples.jsonl"
    samples.write_bytes(b'{"task_id": "HumanEval/0", "completion": "x"}\n'
                        b'{"task_id": "HumanEval/0", "completion": "caf\xe9"}\n')
    assert main(["eval-code", "--samples", str(samples)]) == 2
    assert f"{samples}:2: not valid UTF-8" in capsys.readouterr().err
