"""No traceback for a user's mistake: PosttrainErrors and the OSErrors a user causes (a wrong
path, a full disk) print one ``error:`` line and exit 2; ``--debug`` or ``POSTTRAIN_DEBUG=1``
shows the traceback; a bug still shows it. SIGINT and SIGTERM during training save a
checkpoint, say so, exit 128 + signal, and the run resumes from that checkpoint."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from posttrain import cli
from posttrain.errors import ConfigError
from posttrain.train.metrics import read_metrics
from posttrain.train.run import Interrupted, StopOnSignal


def _raising(exc: BaseException):  # noqa: ANN202
    def handler(argv: list[str]) -> int:
        raise exc

    return handler


USER_OS_ERRORS = [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "data/x.jsonl"),
     "error: No such file or directory: 'data/x.jsonl'"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/run"),
     "error: Permission denied: '/root/run'"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "runs/a"),
     "error: Is a directory: 'runs/a'"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "f.txt/run"),
     "error: Not a directory: 'f.txt/run'"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/a/checkpoints"),
     "error: No space left on device: 'runs/a/checkpoints' (free some space"),
]


@pytest.mark.parametrize(("exc", "line"), USER_OS_ERRORS)
def test_user_os_errors_print_one_line(exc: OSError, line: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setitem(cli.HANDLERS, "tasks", _raising(exc))
    assert cli.main(["tasks"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.endswith("(run with --debug for the traceback)\n"), err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--debug", "tasks"], ["tasks", "--debug"]])
def test_debug_flag_anywhere_shows_the_traceback(argv: list[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setitem(cli.HANDLERS, "tasks", _raising(FileNotFoundError(2, "gone", "x")))
    with pytest.raises(FileNotFoundError):
        cli.main(argv)
    with pytest.raises(ConfigError, match="unknown config key 'lrr'"):
        cli.main(["sft", "lrr=1", "--debug"])


def test_debug_flag_is_stripped_before_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setitem(cli.HANDLERS, "tasks", lambda argv: seen.append(argv) or 0)
    assert cli.main(["tasks", "a", "--debug", "b"]) == 0
    assert seen == [["a", "b"]]


@pytest.mark.parametrize(("value", "debug"), [("1", True), ("yes", True), ("0", False),
                                              ("", False)])
def test_debug_env(value: str, debug: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.DEBUG_ENV, value)
    monkeypatch.setitem(cli.HANDLERS, "tasks", _raising(ConfigError("bad")))
    if debug:
        with pytest.raises(ConfigError):
            cli.main(["tasks"])
    else:
        assert cli.main(["tasks"]) == 2


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("x"),
                                 OSError(errno.EIO, "Input/output error")])
def test_a_bug_still_raises(exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setitem(cli.HANDLERS, "tasks", _raising(exc))
    with pytest.raises(type(exc)):
        cli.main(["tasks"])


def _posttrain(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                       **(env or {})})


def test_real_path_mistakes_in_a_subprocess(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = _posttrain("init-tiny", str(afile / "m"))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: Not a directory: '{afile / 'm'}' (run with --debug for "
                           "the traceback)\n")
    proc = _posttrain("sft", "model=tiny:nano", "data=task:chat:size=8", "max_steps=1",
                      f"output_dir={afile / 'run'}")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last.startswith("error: ") and str(afile) in last, proc.stderr
    for debug in (["--debug"], []):
        env = {} if debug else {cli.DEBUG_ENV: "1"}
        proc = _posttrain("init-tiny", str(afile / "m"), *debug, env=env)
        assert proc.returncode == 1
        assert "Traceback" in proc.stderr and "NotADirectoryError" in proc.stderr


def test_a_bug_prints_its_traceback_in_a_subprocess() -> None:
    code = ("import sys; from posttrain import cli\n"
            "def bug(argv): raise ZeroDivisionError('internal')\n"
            "cli.HANDLERS['tasks'] = bug\nsys.exit(cli.main(['tasks']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ZeroDivisionError: internal" in proc.stderr


# --------------------------------------------------------------------------- signals


def _fake_engine(run_dir: Path, step: int = 3) -> SimpleNamespace:
    return SimpleNamespace(run_dir=run_dir, step=step, total_steps=10, device="cpu",
                           dist=SimpleNamespace(enabled=False, is_main=True))


def test_stop_on_signal_waits_for_the_step_then_saves(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    saved = []
    with StopOnSignal() as stop:
        stop.after_step(_fake_engine(tmp_path), lambda: saved.append(1) or tmp_path)
        assert not saved  # no signal: nothing happens
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in this (main) thread, between bytecodes
        assert stop.received == signal.SIGTERM
        with pytest.raises(Interrupted) as err:
            stop.after_step(_fake_engine(tmp_path), lambda: saved.append(1) or tmp_path / "c")
        assert saved == [1] and err.value.signum == signal.SIGTERM
        assert str(err.value).startswith("interrupted by SIGTERM at step 3 of 10: saved "
                                         f"checkpoint {tmp_path / 'c'}; run the same command")
        with pytest.raises(Interrupted, match="SIGTERM again: stopped at once"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_stop_on_signal_does_not_save_a_step_twice(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step-3").mkdir(parents=True)  # save_steps saved it already
    with StopOnSignal() as stop:
        stop.received = signal.SIGINT
        with pytest.raises(Interrupted, match="SIGINT at step 3 of 10: saved checkpoint "
                                              f"{re.escape(str(tmp_path))}/checkpoints/step-3"):
            stop.after_step(_fake_engine(tmp_path), lambda: pytest.fail("saved twice"))


# Each optimizer step sleeps STEP_SLEEP seconds, so the signal surely lands mid-run.
_CHILD = """
import os, sys, time
from posttrain.train import engine
update = engine.Engine.update
def slow_update(self, *args, **kwargs):
    out = update(self, *args, **kwargs)
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    return out
engine.Engine.update = slow_update
from posttrain.cli import main
sys.exit(main(sys.argv[1:]))
"""

RUNS = {
    "sft": ["sft", "model=tiny:nano", "data=task:chat:size=64", "max_steps=30", "batch_size=2",
            "max_length=128", "lr=1e-3"],
    "grpo": ["grpo", "model=tiny:nano", "data=task:arithmetic:size=32", "max_steps=8",
             "prompts_per_step=2", "num_generations=2", "max_new_tokens=8", "max_length=64",
             "rewards=[numeric]"],
}


def _child(args: list[str], sleep: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, "-c", _CHILD, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize(("command", "sig"), [("sft", signal.SIGTERM), ("sft", signal.SIGINT),
                                              ("grpo", signal.SIGTERM)])
def test_signal_saves_a_checkpoint_and_the_run_resumes(command: str, sig: int,
                                                       tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*RUNS[command], f"output_dir={run}", "logging_steps=1"]
    proc = _child(args, sleep=0.5)
    deadline = time.time() + 240
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and '"train/loss"' in metrics.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no training step within the deadline"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    m = re.search(rf"interrupted by {name} at step (\d+) of (\d+): saved checkpoint (\S+);",
                  err)
    assert m is not None, err[-3000:]
    step, total, path = int(m[1]), int(m[2]), Path(m[3])
    assert path == run / "checkpoints" / f"step-{step}" and path.is_dir() and step < total
    assert not (run / "final").exists()

    resumed = _child([*args, "resume=true"], sleep=0)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert (run / "final").is_dir()
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, total + 1))  # each step logged once, none lost
