"""The command line: help, config errors, bad data errors, utility commands."""

from __future__ import annotations

import json
import subprocess
import sys

from posttrain.cli import main


def test_help_lists_every_option(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("model", "data", "max_steps", "grad_accum", "lr", "precision", "lora.r",
                "packing", "save_steps", "resume", "report_to"):
        assert key in out


def test_unknown_key_names_the_closest(capsys, tmp_path):
    assert main(["sft", "lrr=1e-3", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "lrr" in err and "'lr'" in err and "Traceback" not in err


def test_wrong_type_names_the_field(capsys, tmp_path):
    assert main(["sft", "max_steps=ten", "data=task:chat", f"output_dir={tmp_path}"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_bad_row_error_names_file_line_and_field(tmp_path):
    data = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "bot", "content": "hi"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "sft", "model=tiny:nano",
                           f"data={data}", f"output_dir={tmp_path / 'run'}", "max_steps=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{data}:2" in proc.stderr and "role" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_skip_bad_rows_counts_them(tmp_path):
    from posttrain.train.metrics import read_metrics

    data = tmp_path / "mixed.jsonl"
    good = {"prompt": "2+2=", "completion": "4"}
    data.write_text("\n".join([json.dumps(good)] * 3 + ['{"prompt": "x"}', "not json"]) + "\n")
    assert main(["sft", "model=tiny:nano", f"data={data}", f"output_dir={tmp_path / 'r'}",
                 "max_steps=2", "on_bad_row=skip"]) == 0
    first = read_metrics(tmp_path / "r" / "metrics.jsonl")[0]
    assert first["data/skipped_rows"] == 2 and first["data/rows"] == 3


def test_existing_run_is_refused(capsys, tmp_path, chat_jsonl):
    args = ["sft", "model=tiny:nano", f"data={chat_jsonl}", f"output_dir={tmp_path}",
            "max_steps=1"]
    assert main(args) == 0
    assert main(args) == 2
    assert "is a finished run (final/ exists)" in capsys.readouterr().err


def test_unknown_command_suggests(capsys):
    assert main(["stf"]) == 2
    assert "'sft'" in capsys.readouterr().err


def test_init_tiny_and_tasks(tmp_path, capsys):
    assert main(["init-tiny", str(tmp_path / "m"), "--size", "nano"]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert main(["tasks"]) == 0
    assert "task:chat" in capsys.readouterr().out


def test_chat_streams_a_reply(nano_dir):
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "chat", str(nano_dir),
                           "--max-new-tokens", "8", "--temperature", "0"],
                          input="hello\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "assistant>" in proc.stdout
