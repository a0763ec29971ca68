"""What a run does with each stage (skip, resume, redo), the records it writes, and the
selection options; on a stage kind that trains nothing, so every decision is quick to test."""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from posttrain.errors import PosttrainError, TrainingError
from posttrain.pipeline import PipelineError, StageKind, register_kind, run_pipeline

CALLS: list[tuple[str, bool]] = []  # (stage, resume) of every run of a fake stage
CRASH: dict[str, int] = {}  # stage -> the step at which it fails


@dataclass
class FakeConfig:
    model: str = "base"
    data: str | None = "rows"
    x: int = 0
    steps: int = 3
    crash_at: int = 0  # for worker processes, which do not see CRASH
    output_dir: str = "runs/run"
    resume: bool = False


def fake_train(cfg: FakeConfig) -> Path:
    """Checkpoints every step like the engine; crashes where CRASH says; writes final/."""
    run = Path(cfg.output_dir)
    CALLS.append((run.name, cfg.resume))
    done = sorted(run.glob("checkpoints/step-*")) if cfg.resume else []
    first = int(done[-1].name.split("-")[1]) + 1 if done else 1
    for step in range(first, cfg.steps + 1):
        if step in (CRASH.get(run.name), cfg.crash_at):
            raise TrainingError(f"crashed at step {step}")
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
    (run / "final").mkdir()
    made = {"from": cfg.model, "x": cfg.x, "started_at": first, "pid": os.getpid(),
            "threads": torch.get_num_threads()}
    (run / "final" / "model.json").write_text(json.dumps(made))
    (run / "metrics.jsonl").write_text(json.dumps({"step": cfg.steps, "time": 1.0,
                                                   "train/loss": 0.5}) + "\n")
    return run / "final"


register_kind("fake", StageKind("a stage that trains nothing", lambda: FakeConfig, fake_train))

PIPE = """
stages:
  a: {kind: fake}
  b: {kind: fake, model: "${a.output}"}
  c: {kind: fake, model: "${b.output}", x: 1}
  side: {kind: fake}
"""


@pytest.fixture(autouse=True)
def _clean() -> None:
    CALLS.clear()
    CRASH.clear()


def write(tmp_path: Path, body: str = PIPE) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\n" + textwrap.dedent(body))
    return path


def stage_json(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "out" / name / "stage.json").read_text())


def model(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "out" / name / "final" / "model.json").read_text())


def test_runs_in_order_and_records_each_stage(tmp_path: Path) -> None:
    outputs = run_pipeline(write(tmp_path))
    out = tmp_path / "out"
    assert CALLS == [("a", False), ("b", False), ("c", False), ("side", False)]
    assert outputs == {n: out / n / "final" for n in ("a", "b", "c", "side")}
    assert model(tmp_path, "c")["from"] == str(out / "b" / "final")
    top = json.loads((out / "pipeline.json").read_text())
    assert top["file"] == str(tmp_path / "pipe.yaml") and top["stages"] == ["a", "b", "c", "side"]
    assert top["resolved"]["c"] == {"model": str(out / "b" / "final"), "data": "rows", "x": 1,
                                    "steps": 3, "crash_at": 0, "output_dir": str(out / "c"),
                                    "resume": False}
    b = stage_json(tmp_path, "b")
    assert b["name"] == "b" and b["kind"] == "fake" and b["status"] == "done"
    assert b["inputs"] == {"a": stage_json(tmp_path, "a")["fingerprint"]}
    assert b["metrics"] == {"steps": 3, "train/loss": 0.5} and b["seconds"] >= 0


def test_a_done_stage_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_pipeline(write(tmp_path))
    CALLS.clear()
    with caplog.at_level("INFO", logger="posttrain"):
        run_pipeline(write(tmp_path))
    assert CALLS == []
    assert "stage b (fake): skipped, done, fingerprint" in caplog.text


def test_a_changed_stage_reruns_from_scratch_with_everything_downstream(tmp_path: Path) -> None:
    run_pipeline(write(tmp_path))
    (tmp_path / "out" / "b" / "stray").write_text("from the old run")
    CALLS.clear()
    run_pipeline(write(tmp_path), overrides=["stages.b.x=5"])
    assert CALLS == [("b", False), ("c", False)]
    assert not (tmp_path / "out" / "b" / "stray").exists()  # a fresh directory
    assert model(tmp_path, "b")["x"] == 5


def test_force_reruns_the_stage_and_downstream(tmp_path: Path) -> None:
    run_pipeline(write(tmp_path))
    CALLS.clear()
    run_pipeline(write(tmp_path), force=["b"])
    assert CALLS == [("b", False), ("c", False)]


def test_a_crashed_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    CRASH["b"] = 3
    with pytest.raises(PosttrainError, match=r"stage 'b' \(fake\): crashed at step 3"):
        run_pipeline(write(tmp_path))
    failed = stage_json(tmp_path, "b")
    assert failed["status"] == "failed" and failed["error"] == "crashed at step 3"
    assert [c[0] for c in CALLS] == ["a", "b"]  # nothing after the failure
    CRASH.clear()
    CALLS.clear()
    run_pipeline(write(tmp_path))
    assert CALLS == [("b", True), ("c", False), ("side", False)]
    assert model(tmp_path, "b")["started_at"] == 3  # steps 1-2 came from the checkpoints
    assert stage_json(tmp_path, "b")["status"] == "done"


def test_until_and_only(tmp_path: Path) -> None:
    assert list(run_pipeline(write(tmp_path), until="b")) == ["a", "b"]
    assert CALLS == [("a", False), ("b", False)]
    CALLS.clear()
    assert list(run_pipeline(write(tmp_path), only="c")) == ["c"]
    assert CALLS == [("c", False)]
    with pytest.raises(PipelineError, match="--only c: its input"):
        run_pipeline(write(tmp_path), only="c", overrides=["stages.b.x=2"])  # b is not done
    with pytest.raises(PipelineError, match="--until nope: no such stage"):
        run_pipeline(write(tmp_path), until="nope")


def test_repeat_runs_rounds_that_chain(tmp_path: Path) -> None:
    body = PIPE + "repeat: {stages: [b], rounds: 3, start: {b: a}}\n"
    body = body.replace('model: "${a.output}"', 'model: "${b.output}"')
    run_pipeline(write(tmp_path, body))
    assert [c[0] for c in CALLS] == ["a", "b@1", "b@2", "b@3", "c", "side"]
    out = tmp_path / "out"
    assert model(tmp_path, "b@1")["from"] == str(out / "a" / "final")
    assert model(tmp_path, "b@3")["from"] == str(out / "b@2" / "final")
    assert model(tmp_path, "c")["from"] == str(out / "b@3" / "final")
    CALLS.clear()
    run_pipeline(write(tmp_path, body), force=["b@2"])
    assert [c[0] for c in CALLS] == ["b@2", "b@3", "c"]


def test_branches_run_side_by_side_in_workers(tmp_path: Path) -> None:
    body = """
        workers: 2
        stages:
          a: {kind: fake}
          left: {kind: fake, model: "${a.output}"}
          right: {kind: fake, model: "${a.output}", crash_at: 2}
          after: {kind: fake, model: "${right.output}"}
        """
    with pytest.raises(PosttrainError, match=r"stage 'right' \(fake\): crashed at step 2"):
        run_pipeline(write(tmp_path, body))
    assert model(tmp_path, "a")["pid"] == os.getpid()  # everything else depends on it: here
    left = model(tmp_path, "left")
    assert left["pid"] != os.getpid() and left["threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert stage_json(tmp_path, "left")["status"] == "done"  # the other branch finished
    assert stage_json(tmp_path, "right")["status"] == "failed"
    assert not (tmp_path / "out" / "after").exists()
    run_pipeline(write(tmp_path, body), overrides=["stages.right.crash_at=0"])
    assert model(tmp_path, "after")["from"] == str(tmp_path / "out" / "right" / "final")


def test_a_stage_listed_alone_runs_here_with_every_core(tmp_path: Path) -> None:
    """`sft` could run beside `peek` (which only reads `a`), so without `alone` it would run
    in a worker with half the cores; listed, it runs here and `peek` waits."""
    body = """
        workers: 2
        alone: [sft]
        stages:
          a: {kind: fake}
          sft: {kind: fake, model: "${a.output}"}
          peek: {kind: fake, model: "${a.output}"}
          after: {kind: fake, model: "${sft.output}"}
        """
    run_pipeline(write(tmp_path, body))
    assert model(tmp_path, "sft")["pid"] == os.getpid()
    assert model(tmp_path, "sft")["threads"] == torch.get_num_threads()
    assert model(tmp_path, "peek")["pid"] != os.getpid()
    bad = body.replace("alone: [sft]", "alone: [sfx]")
    with pytest.raises(PosttrainError, match=r"alone: expected a list of the file's stages"):
        run_pipeline(write(tmp_path, bad))


def test_side_by_side_the_deepest_ready_stage_starts_first(tmp_path: Path) -> None:
    """After `a`, `short` comes first in the file but `long` has two stages after it: side by
    side, `long` starts first; one after another, the file's order stands."""
    from posttrain.pipeline import load_plan
    from posttrain.pipeline.runner import _depths, _Runner, plan_steps

    body = """
        workers: 2
        stages:
          a: {kind: fake}
          short: {kind: fake, model: "${a.output}"}
          long: {kind: fake, model: "${a.output}"}
          long2: {kind: fake, model: "${long.output}"}
          long3: {kind: fake, model: "${long2.output}"}
        """
    plan = load_plan(write(tmp_path, body))
    assert _depths(plan) == {"a": 4, "short": 1, "long": 3, "long2": 2, "long3": 1}
    runner = _Runner(plan, 2)
    runner.pending = [s for s in plan_steps(plan) if s.stage.name != "a"]  # a is done
    runner.waiting = {s.stage.name for s in runner.pending}
    assert [s.stage.name for s in runner.ready()] == ["long", "short"]
    runner.workers = 1
    assert [s.stage.name for s in runner.ready()] == ["short", "long"]
