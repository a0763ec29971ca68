"""Sandbox basics: statuses, output capture and caps, limits, the worker pool, the CLI.

The attacks live in test_sandbox_attacks.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from posttrain.errors import ConfigError
from posttrain.sandbox import (
    SandboxConfig,
    SandboxUnavailableError,
    check_isolation,
    run_many,
    run_program,
)
from posttrain.sandbox import runner as sandbox_runner
from posttrain.sandbox.bwrap import find_bwrap
from posttrain.sandbox.cli import main as sandbox_main
from posttrain.sandbox.runner import probe_bwrap

_BWRAP = find_bwrap()
_BWRAP_PROBLEM = "bwrap not installed" if _BWRAP is None else probe_bwrap(_BWRAP)
needs_bwrap = pytest.mark.skipif(
    _BWRAP_PROBLEM is not None,
    reason=f"bubblewrap unavailable ({_BWRAP_PROBLEM}); apt-get install bubblewrap")
# As root, limits-only mode drops to a fresh uid, which must be able to exec the interpreter.
SYSTEM_PY = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                  if os.path.exists(p)), None)
LIMITS_PY = SYSTEM_PY if os.geteuid() == 0 else sys.executable


@needs_bwrap
def test_passing_program_captures_stdout_and_stderr():
    res = run_program("import sys\nprint('hello')\nprint('oops', file=sys.stderr)")
    assert (res.status, res.returncode, res.isolation) == ("passed", 0, "bwrap")
    assert res.stdout == "hello\n" and res.stderr == "oops\n"
    assert res.passed and not res.truncated and res.duration_s > 0


@needs_bwrap
@pytest.mark.parametrize("code, reason", [
    ("assert 1 + 1 == 3", "AssertionError"),
    ("def f(:\n    pass", "SyntaxError: invalid syntax"),
    ("raise ValueError('bad value')", "ValueError: bad value"),
    ("import sys\nsys.exit(3)", "exit code 3"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "killed by SIGSEGV"),
])
def test_failures_say_why(code, reason):
    res = run_program(code)
    assert res.status == "failed"
    assert res.reason == reason


@needs_bwrap
def test_timeout_kills_at_the_deadline():
    res = run_program("while True:\n    pass", timeout_s=0.5)
    assert res.status == "timeout" and "wall-clock" in res.reason
    assert res.duration_s >= 0.5  # (no upper bound: DESIGN.md §5, no wall-clock asserts)


@needs_bwrap
def test_output_is_capped_and_the_writer_stopped():
    res = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)",
                      max_output_bytes=10_000, timeout_s=5)
    assert res.status == "failed" and res.truncated
    assert res.reason == "output limit exceeded (stdout > 10000 bytes)"
    assert res.stdout == "x" * 10_000
    # status 'failed', not 'timeout': it was killed at the cap, long before the deadline


@needs_bwrap
def test_stdin_is_fed_even_when_larger_than_a_pipe_buffer():
    data = "".join(f"{i}\n" for i in range(100_000))  # ~590 kB
    res = run_program("import sys\nprint(sum(int(x) for x in sys.stdin))", stdin=data)
    assert res.stdout.strip() == str(sum(range(100_000)))
    res = run_program("print('ignores stdin')", stdin=data)  # never reads: no deadlock
    assert res.passed


@needs_bwrap
def test_memory_limit():
    res = run_program("x = bytearray(300 * 2**20)", memory_mb=128)
    assert res.status == "failed" and res.reason == "MemoryError"


@needs_bwrap
def test_process_limit_applies_per_run():
    code = ("import os, time\nn = 0\nfor _ in range(40):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(2)\n"
            "        os._exit(0)\n    n += 1\nprint(n)")
    results = run_many([code, code], workers=2, max_procs=8)
    for res in results:  # both runs at once: each gets its own budget
        assert res.passed, res
        assert 4 <= int(res.stdout) < 8


@needs_bwrap
def test_file_size_limit():
    res = run_program("open('big', 'wb').write(b'0' * (3 * 2**20))", max_file_mb=1)
    assert res.status == "failed" and "File too large" in res.reason


@needs_bwrap
def test_site_packages_hidden_unless_asked():
    pytest.importorskip("numpy")
    assert run_program("import numpy").reason.startswith("ModuleNotFoundError")
    assert run_program("import numpy", site_packages=True).passed


@needs_bwrap
def test_run_many_keeps_order():
    programs = [f"import time\ntime.sleep({0.05 * (i % 3)})\nprint({i})" for i in range(12)]
    results = run_many(programs, workers=4)
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(12)]
    assert run_many([]) == []
    with pytest.raises(ValueError):
        run_many(["print(1)"], stdins=[None, None])


def test_config_is_validated():
    with pytest.raises(ConfigError, match="isolation"):
        SandboxConfig(isolation="docker")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ConfigError, match="unknown sandbox option"):
        SandboxConfig().replace(timeout=3)


def test_missing_bwrap_is_refused_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(sandbox_runner, "find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailableError) as e:
        run_program("print(1)")
    assert "apt-get install bubblewrap" in str(e.value) and "limits-only" in str(e.value)
    with pytest.raises(SandboxUnavailableError):
        run_many(["print(1)"], isolation="bwrap")


@pytest.mark.skipif(LIMITS_PY is None, reason="no world-readable python3 for limits-only")
def test_limits_only_is_explicit_and_loud(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_runner, "find_bwrap", lambda: None)
    monkeypatch.setattr(sandbox_runner, "_warned_limits_only", False)
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        res = run_program("print(6 * 7)", isolation="limits-only", python=LIMITS_PY)
    assert (res.status, res.stdout, res.isolation) == ("passed", "42\n", "limits-only")
    assert "limits-only" in caplog.text and "CAN read host files" in caplog.text
    res = run_program("while True:\n    pass", isolation="limits-only", python=LIMITS_PY,
                      timeout_s=0.5)
    assert res.status == "timeout"


@needs_bwrap
def test_check_isolation_reports_bwrap():
    report = check_isolation()
    assert report["bwrap_works"] and report["isolation"] == "bwrap"
    assert report["bwrap_path"] and report["bwrap_version"]
    assert any("network" in layer for layer in report["layers"])


@needs_bwrap
def test_cli_run_prints_json_and_exit_code(tmp_path, capsys):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("print('fine')\n")
    bad.write_text("assert False, 'nope'\n")
    assert sandbox_main(["run", str(good), "--timeout", "3", "--memory", "256"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "passed" and out["stdout"] == "fine\n"
    assert sandbox_main(["run", str(bad)]) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "AssertionError: nope"
    assert sandbox_main(["check"]) == 0
    assert json.loads(capsys.readouterr().out)["bwrap_works"] is True


def test_cli_unreadable_file_is_a_clear_error(tmp_path):
    from posttrain.errors import PosttrainError

    with pytest.raises(PosttrainError, match="cannot read"):
        sandbox_main(["run", str(Path(tmp_path) / "missing.py")])


@pytest.mark.skipif(os.geteuid() != 0 or SYSTEM_PY is None,
                    reason="the fresh-uid reaper of limits-only mode needs root and a "
                           "world-readable python3")
def test_limits_only_as_root_reaps_detached_children(monkeypatch):
    import secrets
    import time

    marker = f"limits-only-detached-{secrets.token_hex(6)}"
    child = "import time\ntime.sleep(120)"
    code = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', {child!r}, {marker!r}])\n"
            "print(os.getuid())\n")
    monkeypatch.setattr(sandbox_runner, "_warned_limits_only", True)  # keep the log quiet
    res = run_program(code, isolation="limits-only", python=SYSTEM_PY)
    assert res.passed and int(res.stdout) != 0  # ran as a fresh, unprivileged uid

    def alive() -> bool:
        for d in os.listdir("/proc"):
            try:
                if d.isdigit() and marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        return False

    for _ in range(40):
        if not alive():
            return
        time.sleep(0.05)
    raise AssertionError("a detached child outlived its limits-only run")


@needs_bwrap
def test_interpreter_of_a_venv_under_tmp_is_visible(tmp_path: Path):
    # The sandbox's work dir is a tmpfs on /tmp: a venv made under /tmp (CI's, pytest's
    # tmp_path) must be bound on top of it, not hidden beneath it.
    import venv

    venv.create(tmp_path / "venv", with_pip=False, symlinks=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    res = run_program("print(6 * 7)", python=python)
    assert (res.status, res.stdout) == ("passed", "42\n"), res
