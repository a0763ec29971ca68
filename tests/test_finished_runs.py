"""A finished run (one with ``final/``) is never replaced unless ``overwrite=true``: resuming
it or starting afresh in its directory is refused before any work, for every training
command; ``overwrite=true`` replaces it cleanly (no duplicate steps in metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.commands import TRAIN_COMMANDS

FINISHED = "is a finished run (final/ exists); use a new output_dir, or overwrite=true"


def _steps(run: Path) -> list[int]:
    """The steps of the training rows (a start also logs a data row, at the step it starts)."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    return [r["step"] for r in rows if "train/loss" in r]


def _final_bytes(run: Path) -> bytes:
    return (run / "final" / "model.safetensors").read_bytes()


def _sft(run: Path, data: Path, *extra: str) -> int:
    return main(["sft", "model=tiny:nano", f"data={data}", f"output_dir={run}", "max_steps=1",
                 "max_length=128", "batch_size=4", *extra])


@pytest.mark.parametrize("extra", [("resume=true",), ()], ids=["resume", "fresh"])
def test_finished_run_is_refused(capsys, tmp_path, chat_jsonl, extra) -> None:
    run = tmp_path / "run"
    assert _sft(run, chat_jsonl) == 0
    before_final, before_steps = _final_bytes(run), _steps(run)
    capsys.readouterr()
    assert _sft(run, chat_jsonl, "max_steps=2", "seed=3", *extra) == 2
    err = capsys.readouterr().err
    assert f"{run} {FINISHED}" in err and "Traceback" not in err
    assert _final_bytes(run) == before_final and _steps(run) == before_steps


# What the online commands need besides data before they start.
_ONLINE = {"grpo": ["rewards=[numeric]"], "ppo": ["rewards=[numeric]", "value_model=policy"]}


def test_every_training_command_refuses_a_finished_run(capsys, tmp_path) -> None:
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for name in TRAIN_COMMANDS:
        args = [name, "model=tiny:nano", "data=task:chat", f"output_dir={run}", "resume=true",
                *_ONLINE.get(name, [])]
        assert main(args) == 2, name
        assert FINISHED in capsys.readouterr().err, name
    assert list(run.iterdir()) == [run / "final"]  # nothing written


def test_overwrite_replaces_a_finished_run(tmp_path, chat_jsonl) -> None:
    run = tmp_path / "run"
    assert _sft(run, chat_jsonl, "save_steps=1", "max_steps=2") == 0
    (run / "notes.txt").write_text("mine")  # not the run's: kept
    before = _final_bytes(run)
    assert _sft(run, chat_jsonl, "max_steps=3", "seed=5", "overwrite=true") == 0
    assert _steps(run) == [1, 2, 3]
    assert _final_bytes(run) != before
    assert not (run / "checkpoints").exists() and (run / "notes.txt").read_text() == "mine"


def test_overwrite_with_resume_continues_from_the_checkpoint(tmp_path, chat_jsonl) -> None:
    run = tmp_path / "run"
    assert _sft(run, chat_jsonl, "save_steps=1", "max_steps=3") == 0
    assert _sft(run, chat_jsonl, "save_steps=1", "max_steps=4", "resume=true",
                "overwrite=true") == 0
    assert _steps(run) == [1, 2, 3, 4]  # continued from step-2, no duplicate steps


def test_fresh_start_after_a_run_killed_before_its_first_checkpoint(tmp_path, chat_jsonl):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n')
    assert _sft(run, chat_jsonl, "resume=true") == 0
    assert 9.0 not in [json.loads(ln).get("train/loss")
                       for ln in (run / "metrics.jsonl").read_text().splitlines()]
