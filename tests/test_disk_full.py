"""A full disk never loses a run: a checkpoint or final/ write that runs out of space removes
its temporary directory, says in one line what is intact, and the last checkpoint still
resumes. The full disk is simulated by a writer that writes some bytes and then raises
ENOSPC (mounting a small tmpfs needs privileges tests do not have)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.cli import main
from posttrain.train import checkpoint as ckpt
from posttrain.train import engine as engine_mod

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _sft(run: Path, data: Path, *extra: str) -> int:
    return main(["sft", "model=tiny:nano", f"data={data}", f"output_dir={run}", "max_steps=4",
                 "max_length=128", "batch_size=4", "save_steps=2", *extra])


def _full_after(monkeypatch, calls: int) -> None:
    """torch.save works ``calls`` times, then writes a few bytes and fails as on a full disk
    (through a file object, as checkpoint.py calls it, torch's own error hides the OSError
    in its context, like the real one)."""
    real = torch.save
    seen = {"n": 0}

    def save(obj, f, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] <= calls:
            return real(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a zip")
        try:
            raise ENOSPC
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "704 vs 598") from None

    monkeypatch.setattr(torch, "save", save)


def _temporaries(run: Path) -> list[Path]:
    return [*run.glob(".tmp-*"), *run.glob("checkpoints/.tmp-*")]


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(monkeypatch, capsys, tmp_path,
                                                              chat_jsonl):
    run = tmp_path / "run"
    _full_after(monkeypatch, calls=1)  # step-2 saves, step-4 hits the full disk
    assert _sft(run, chat_jsonl, "max_steps=6") == 2
    err = capsys.readouterr().err
    assert (f"error: no space left writing checkpoint step-4 in {run / 'checkpoints'} (step-2 "
            "is intact; free space, then resume=true continues from it)") in err
    assert "Traceback" not in err
    assert _temporaries(run) == []
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    monkeypatch.undo()  # space freed
    assert _sft(run, chat_jsonl, "max_steps=6", "resume=true") == 0
    steps = [s for s, _ in ckpt.list_checkpoints(run)]
    assert steps == [2, 4] and (run / "final" / "model.safetensors").exists()


def test_disk_full_at_the_first_checkpoint_says_the_steps_are_lost(monkeypatch, capsys,
                                                                   tmp_path, chat_jsonl):
    run = tmp_path / "run"
    _full_after(monkeypatch, calls=0)
    assert _sft(run, chat_jsonl) == 2
    err = capsys.readouterr().err
    assert ("no space left writing checkpoint step-2 in" in err
            and "no earlier checkpoint: the 2 steps trained are lost" in err), err
    assert _temporaries(run) == [] and ckpt.list_checkpoints(run) == []


def _full_models(monkeypatch, only_final: bool = False) -> None:
    """Model saves (safetensors, tokenizer) write a file, then fail as on a full disk; with
    ``only_final``, only the save of final/."""
    real = engine_mod.save_pretrained_for_run

    def save(model, tokenizer, path, merge=False):
        if only_final and not Path(path).name.startswith(".tmp-final"):
            return real(model, tokenizer, path, merge=merge)
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine_mod, "save_pretrained_for_run", save)


def test_disk_full_writing_final_names_the_last_checkpoint(monkeypatch, capsys, tmp_path,
                                                           chat_jsonl):
    run = tmp_path / "run"
    _full_models(monkeypatch, only_final=True)
    assert _sft(run, chat_jsonl, "max_steps=3") == 2
    err = capsys.readouterr().err
    assert (f"error: no space left writing final/ in {run} (the last checkpoint step-2 is "
            "intact; free space, then resume=true finishes the run from it)") in err
    assert _temporaries(run) == [] and not (run / "final").exists()
    monkeypatch.undo()
    assert _sft(run, chat_jsonl, "max_steps=3", "resume=true") == 0
    assert (run / "final" / "model.safetensors").exists()


def test_disk_full_writing_final_without_checkpoints_says_what_is_lost(monkeypatch, capsys,
                                                                       tmp_path, chat_jsonl):
    run = tmp_path / "run"
    _full_models(monkeypatch)
    assert _sft(run, chat_jsonl, "save_steps=0", "max_steps=2") == 2
    err = capsys.readouterr().err
    assert (f"error: no space left writing final/ in {run} (no checkpoint was saved with "
            "save_steps=0, so the 2 trained steps are lost; final/ needs about ") in err, err
    assert _temporaries(run) == []


def test_write_failure_recognises_each_library_s_full_disk() -> None:
    try:
        try:
            raise ENOSPC
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904
    except RuntimeError as e:
        assert ckpt.write_failure(e) == "no space left"  # torch.save through a file object
    safetensors = Exception("Error while serializing: I/O error: No space left on device "
                            "(os error 28)")
    assert ckpt.write_failure(safetensors) == "no space left"
    assert ckpt.write_failure(OSError(errno.EDQUOT, "quota")) == "disk quota exceeded"
    assert ckpt.write_failure(OSError(errno.EROFS, "ro")) == "read-only file system"
    assert ckpt.write_failure(ValueError("a bug, not a write")) is None


def test_a_bug_inside_a_save_propagates_and_removes_the_temporary(tmp_path) -> None:
    def broken(path: Path) -> None:
        path.mkdir(parents=True)
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        ckpt.save_checkpoint(tmp_path, 1, broken, {"step": 1}, keep_last=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path) -> None:
    dead, alive = _dead_pid(), os.getppid()
    stale = [tmp_path / "checkpoints" / f".tmp-step-4-{dead}", tmp_path / f".tmp-final-{dead}",
             tmp_path / ".tmp-final", tmp_path / "checkpoints" / f".tmp-step-5-{os.getpid()}"]
    live = tmp_path / "checkpoints" / f".tmp-step-9-{alive}"  # another process still writing
    for d in [*stale, live]:
        d.mkdir(parents=True)
        (d / "weights").write_bytes(b"\0" * 1024)
    ckpt.clean_stale_temporaries(tmp_path)
    assert [p.exists() for p in stale] == [False] * 4 and live.exists()


def test_resume_cleans_a_killed_save_s_leftover(tmp_path, chat_jsonl) -> None:
    run = tmp_path / "run"
    assert _sft(run, chat_jsonl, "max_steps=3") == 0
    (run / "final").rename(run / "final.bak")
    leftover = run / "checkpoints" / f".tmp-step-4-{_dead_pid()}"
    (leftover / "model").mkdir(parents=True)
    assert _sft(run, chat_jsonl, "max_steps=3", "resume=true", "save_steps=0") == 0
    assert not leftover.exists()


def test_free_space_is_checked_before_the_first_save(monkeypatch, tmp_path, chat_jsonl,
                                                     caplog) -> None:
    usage = ckpt.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage",
                        lambda p: usage._replace(free=1000))
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        assert _sft(tmp_path / "run", chat_jsonl, "max_steps=1") == 0
    warned = [r.getMessage() for r in caplog.records if "is free" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith("a checkpoint (weights + optimizer state) needs about ")
    assert "but only 1000 B is free on the filesystem of" in warned[0]
