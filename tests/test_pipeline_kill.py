"""Acceptance: a pipeline SIGKILLed inside a stage and run again skips the finished stages,
resumes the interrupted one from its last checkpoint, and ends with bit-identical weights to
a run that was never interrupted (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.pipeline import run_pipeline

_CHILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from posttrain.pipeline import run_pipeline
run_pipeline(sys.argv[1])
"""


def _pipeline(tmp_path: Path) -> Path:
    pipe = {
        "output_dir": str(tmp_path / "killed"),
        "seed": 1,
        "defaults": {"batch_size": 4, "max_length": 128, "save_steps": 1, "logging_steps": 1,
                     "ref_cache_dir": str(tmp_path / "ref-cache")},
        "stages": {
            "sft": {"kind": "sft", "model": "tiny:nano", "data": "task:chat:size=32",
                    "max_steps": 2},
            # Long enough that a checkpoint shows up well before the end.
            "dpo": {"kind": "dpo", "model": "${sft.output}", "data": "task:safety_pairs:size=32",
                    "max_steps": 6, "lr": 1e-3},
        },
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def _kill_after_first_checkpoint(path: Path, run_dir: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path),
                              str(torch.get_num_threads())])
    deadline = time.monotonic() + 300
    try:
        while not list(run_dir.glob("checkpoints/step-*")):
            assert child.poll() is None, "the pipeline ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint of the second stage appeared"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(final / "model.safetensors")


@pytest.mark.slow
def test_killed_pipeline_resumes_to_the_same_weights(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = _pipeline(tmp_path)
    killed = tmp_path / "killed"
    _kill_after_first_checkpoint(path, killed / "dpo")
    assert not (killed / "dpo" / "final").exists()  # killed inside the stage
    assert json.loads((killed / "dpo" / "stage.json").read_text())["status"] == "running"
    sft_weights = killed / "sft" / "final" / "model.safetensors"
    sft_written = sft_weights.stat().st_mtime_ns

    with caplog.at_level("INFO", logger="posttrain"):
        run_pipeline(path)
    assert "stage sft (sft): skipped, done" in caplog.text
    assert "stage dpo (dpo): start, running, resuming from step-" in caplog.text
    assert sft_weights.stat().st_mtime_ns == sft_written  # the finished stage was not touched
    assert json.loads((killed / "dpo" / "stage.json").read_text())["status"] == "done"

    straight = tmp_path / "straight"
    run_pipeline(path, output_dir=straight)
    for stage in ("sft", "dpo"):
        got, want = _weights(killed / stage / "final"), _weights(straight / stage / "final")
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"{stage}: {name} differs"
