"""Degenerate inputs get one line, before work is wasted: a damaged checkpoint on resume, an
output_dir that cannot be written, an empty or unwritable eval-code file, and a reward whose
column the data lacks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.errors import PosttrainError, TrainingError
from posttrain.rewards import registry
from posttrain.train import checkpoint as ckpt
from posttrain.train import online


def _sft(run: Path, data: Path, *extra: str) -> int:
    return main(["sft", "model=tiny:nano", f"data={data}", f"output_dir={run}", "max_length=128",
                 "batch_size=4", "save_steps=2", "seed=3", "lr_scheduler=constant", *extra])


def _state(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step}" / ckpt.STATE_FILE


def _damage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a save cut short


# ---- damaged trainer state ------------------------------------------------------------------


def test_resume_skips_a_damaged_checkpoint_for_the_one_before(tmp_path, chat_jsonl, caplog):
    ref = tmp_path / "ref"
    assert _sft(ref, chat_jsonl, "max_steps=6") == 0
    run = tmp_path / "run"
    assert _sft(run, chat_jsonl, "max_steps=5") == 0
    _damage(_state(run, 4))
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        assert _sft(run, chat_jsonl, "max_steps=6", "resume=true", "overwrite=true") == 0
    warned = [r.getMessage() for r in caplog.records if " is damaged " in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(
        f"checkpoint step-4 is damaged ({_state(run, 4)} cannot be read: ")
    assert warned[0].endswith("; resuming from step-2 instead")
    # Resumed from step 2 exactly: the same weights as a run never interrupted.
    a, b = (load_file(r / "final" / "model.safetensors") for r in (ref, run))
    assert all((a[k] == b[k]).all() for k in a)
    assert ckpt.checkpoint_problem(run / "checkpoints" / "step-4") is None  # written again


def test_resume_with_every_checkpoint_damaged_is_one_line(tmp_path, chat_jsonl, capsys):
    run = tmp_path / "run"
    assert _sft(run, chat_jsonl, "max_steps=3") == 0
    _state(run, 2).write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert _sft(run, chat_jsonl, "max_steps=4", "resume=true", "overwrite=true") == 2
    err = capsys.readouterr().err
    assert f"error: {_state(run, 2)} is damaged (" in err
    assert err.strip().endswith("); no earlier checkpoint is intact: drop resume=true and "
                                "pass overwrite=true to start over")
    assert "Traceback" not in err and _state(run, 2).exists()  # nothing deleted


def test_loading_a_damaged_state_names_the_file_and_the_fallback(tmp_path, chat_jsonl):
    run = tmp_path / "run"
    assert _sft(run, chat_jsonl, "max_steps=5") == 0
    _damage(_state(run, 4))
    with pytest.raises(TrainingError) as e:
        ckpt.load_trainer_state(run / "checkpoints" / "step-4")
    msg = str(e.value)
    assert msg.startswith(f"{_state(run, 4)} is damaged (") and "\n" not in msg
    assert msg.endswith(f"the previous checkpoint step-2 is intact: delete "
                        f"{run / 'checkpoints' / 'step-4'} and resume again")


def test_missing_weights_make_a_checkpoint_damaged(tmp_path, chat_jsonl):
    run = tmp_path / "run"
    assert _sft(run, chat_jsonl, "max_steps=5") == 0
    (run / "checkpoints" / "step-4" / "model" / "model.safetensors").unlink()
    assert ckpt.latest_checkpoint(run) == run / "checkpoints" / "step-2"


# ---- output_dir -----------------------------------------------------------------------------


def test_output_dir_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(PosttrainError, match=f"^output_dir '{f}' is a file, not a directory"):
        ckpt.check_output_dir(f)
    with pytest.raises(PosttrainError, match=f"^output_dir '{f / 'run'}' is inside '{f}', a "
                                             "file, not a directory"):
        ckpt.check_output_dir(f / "run")
    ckpt.check_output_dir(tmp_path / "new" / "run")  # fine: created at start


def test_unwritable_output_dir(tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    # chmod does not stop root, so the permission check itself is made to fail here.
    real = ckpt.os.access
    monkeypatch.setattr(ckpt.os, "access", lambda p, m: Path(p) != parent and real(p, m))
    with pytest.raises(PosttrainError, match=f"^output_dir '{parent / 'run'}' is not writable "
                                             f"\\('{parent}' is not writable\\)"):
        ckpt.check_output_dir(parent / "run")


def test_training_into_a_file_fails_before_loading_the_model(tmp_path, chat_jsonl, capsys,
                                                              monkeypatch):
    f = tmp_path / "run"
    f.write_text("mine")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("posttrain.train.policy.load_model", no_model)
    assert _sft(f, chat_jsonl, "max_steps=1") == 2
    err = capsys.readouterr().err
    assert f"error: output_dir '{f}' is a file, not a directory" in err
    assert "Traceback" not in err and f.read_text() == "mine"


# ---- eval-code ------------------------------------------------------------------------------


@pytest.fixture()
def no_sandbox(monkeypatch):
    def run_many(*args, **kwargs):
        raise AssertionError("a sample ran")

    monkeypatch.setattr("posttrain.evals.code.run_many", run_many)


@pytest.mark.parametrize("text", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_eval_code_with_no_samples_is_an_error(tmp_path, capsys, no_sandbox, text):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(text)
    assert main(["eval-code", "--samples", str(samples)]) == 2
    out = capsys.readouterr()
    assert out.err.strip() == (f'error: {samples}: no samples (expected JSONL rows '
                               '{"task_id": ..., "completion": ...})')
    assert out.out == ""


def _one_sample(tmp_path: Path) -> Path:
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "  pass\n"}) + "\n")
    return samples


def test_eval_code_checks_the_results_path_before_evaluating(tmp_path, capsys, no_sandbox):
    samples = _one_sample(tmp_path)
    for results, problem in [
        (samples / "r.jsonl", f"cannot be created ('{samples}' is a file)"),
        (tmp_path, "is a directory"),
    ]:
        assert main(["eval-code", "--samples", str(samples), "--results", str(results)]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"error: --results {results} {problem}; choose another path"


def test_eval_code_limit_zero_is_an_error(tmp_path, capsys, no_sandbox):
    samples = _one_sample(tmp_path)
    assert main(["eval-code", "--samples", str(samples), "--limit", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: no samples to evaluate"


# ---- reward columns -------------------------------------------------------------------------


def _prompts_without_answers(tmp_path: Path) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "level": i}) + "\n"
                            for i in range(8)))
    return data


@pytest.mark.parametrize("extra", [["grpo"], ["ppo", "value_model=policy"]], ids=["grpo", "ppo"])
def test_a_reward_column_missing_from_the_data_fails_before_any_rollout(
        tmp_path, capsys, monkeypatch, extra):
    data = _prompts_without_answers(tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("the policy was loaded")

    monkeypatch.setattr(online, "load_policy", no_model)
    args = [*extra, "model=tiny:nano", f"data={data}", f"output_dir={tmp_path / 'run'}",
            "max_steps=1", "rewards=[format,numeric]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: reward 'numeric' needs column 'answer', which is not a "
                           f"column of {data} (its columns: ['level'])")


def test_an_eval_data_without_the_column_fails_too(tmp_path, capsys, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "1+2?", "answer": None}) + "\n")
    monkeypatch.setattr(online, "load_policy", lambda *a: (_ for _ in ()).throw(AssertionError))
    assert main(["grpo", "model=tiny:nano", f"data={data}", f"eval_data={held}",
                 f"output_dir={tmp_path / 'run'}", "rewards=[numeric]"]) == 2
    assert (f"reward 'numeric' needs column 'answer', which is empty in every row of {held}"
            in capsys.readouterr().err)


def test_required_columns_of_each_kind_of_reward():
    def custom(prompts, completions, *, answer, hint=None, **columns):
        return [0.0] * len(completions)

    assert registry.required_columns(registry.build_reward("numeric")) == ("answer",)
    assert registry.required_columns(registry.build_reward("countdown")) == ("numbers", "target")
    assert registry.required_columns(registry.build_reward("format")) == ()
    assert registry.required_columns(custom) == ("answer",)
    assert registry.required_columns(lambda prompts, completions, **kw: []) == ()
