"""The gate as a pipeline stage: a pass publishes the model; a failure stops the pipeline
before anything after it runs, and nothing is published."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from posttrain.errors import PosttrainError
from posttrain.pipeline import PipelineError, load_plan, run_pipeline


def pipeline(tmp_path: Path, threshold: str, on_fail: str = "stop") -> Path:
    body = f"""
        output_dir: {tmp_path / 'out'}
        workers: 1
        stages:
          sft:
            kind: sft
            model: tiny:nano
            data: task:chat:size=16
            max_steps: 2
            batch_size: 4
          sft_eval:
            kind: eval
            model: ${{sft.output}}
            checks: [arithmetic]
            prompts: 4
            max_new_tokens: 8
          gate:
            kind: gate
            results: ${{sft_eval.output}}
            thresholds: ["{threshold}", "accuracy <= 1"]
            model: ${{sft.output}}
            publish: {tmp_path / 'release'}
            on_fail: {on_fail}
          after:
            kind: eval
            model: ${{sft.output}}
            checks: [arithmetic]
            prompts: 2
            max_new_tokens: 4
        """
    path = tmp_path / "pipe.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_a_passing_gate_publishes_the_model(tmp_path: Path) -> None:
    out = run_pipeline(pipeline(tmp_path, "format_rate >= 0"))
    release = tmp_path / "release"
    assert (release / "config.json").is_file() and not list(tmp_path.glob(".release.*"))
    verdict = json.loads((Path(out["gate"]) / "gate.json").read_text())
    assert verdict["passed"] and len(verdict["checks"]) == 2
    stage = json.loads((tmp_path / "out" / "gate" / "stage.json").read_text())
    assert stage["metrics"]["gate/passed"] == 1.0


def test_a_failing_gate_stops_the_pipeline_and_publishes_nothing(tmp_path: Path) -> None:
    with pytest.raises(PosttrainError, match=r"gate failed.*ended_turn_rate"):
        run_pipeline(pipeline(tmp_path, "ended_turn_rate >= 2"))
    assert not (tmp_path / "release").exists()
    assert not (tmp_path / "out" / "after" / "eval.json").exists()
    verdict = json.loads((tmp_path / "out" / "gate" / "gate.json").read_text())
    assert not verdict["passed"] and [c["passed"] for c in verdict["checks"]] == [False, True]


def test_a_recording_gate_lets_the_pipeline_go_on_and_publishes_nothing(tmp_path: Path) -> None:
    run_pipeline(pipeline(tmp_path, "ended_turn_rate >= 2", on_fail="record"))
    assert not (tmp_path / "release").exists()
    assert (tmp_path / "out" / "after" / "eval.json").exists()
    stage = json.loads((tmp_path / "out" / "gate" / "stage.json").read_text())
    assert stage["metrics"]["gate/passed"] == 0.0 and stage["metrics"]["gate/failed"] == 1.0


def test_a_bad_threshold_is_found_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="gate"):
        load_plan(pipeline(tmp_path, "accuracy >> 2"))
    assert not (tmp_path / "out").exists()
