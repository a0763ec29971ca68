"""Adversarial suite: programs that try to escape or damage the host.

Each attack must be contained: the result says what happened, nothing on the host changed,
and the parent (this test process, plus a canary child of it) is alive. The module ends by
printing "N attacks tried, N contained".
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from posttrain.sandbox import SandboxResult, run_program
from posttrain.sandbox.bwrap import find_bwrap
from posttrain.sandbox.runner import probe_bwrap

_BWRAP = find_bwrap()
_PROBLEM = "bwrap not installed" if _BWRAP is None else probe_bwrap(_BWRAP)
pytestmark = pytest.mark.skipif(
    _PROBLEM is not None, reason=f"bubblewrap unavailable ({_PROBLEM}); apt-get install bubblewrap")

PROJECT = Path(__file__).resolve().parents[1]
_OUTCOMES: dict[str, bool] = {}


class _Summary:
    """Prints the tally in pytest's terminal summary (after output capture has ended)."""

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not _OUTCOMES:
            return
        line = (f"sandbox attacks: {len(_OUTCOMES)} attacks tried, "
                f"{sum(_OUTCOMES.values())} contained")
        failed = sorted(k for k, ok in _OUTCOMES.items() if not ok)
        if failed:
            line += f" (NOT contained: {', '.join(failed)})"
        terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def attack_summary(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("sandbox-attack-summary"):
        manager.register(_Summary(), "sandbox-attack-summary")


@pytest.fixture(scope="module")
def canary() -> Iterator[subprocess.Popen[bytes]]:
    """A child of the test process; an attack that reaches the host's processes kills it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def attack(name: str, canary: subprocess.Popen[bytes]) -> Iterator[None]:
    _OUTCOMES[name] = False
    yield
    assert canary.poll() is None, "the canary process on the host was killed"
    os.kill(os.getpid(), 0)  # and we are, evidently, alive
    _OUTCOMES[name] = True


def _processes_with(marker: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.append(int(d))
    return found


def _assert_no_process_with(marker: str) -> None:
    # Generous polling only absorbs reaping latency: the marked processes sleep for minutes.
    for _ in range(40):
        if not _processes_with(marker):
            return
        time.sleep(0.05)
    raise AssertionError(f"processes still running: {_processes_with(marker)}")


def _run(code: str, **kw: object) -> SandboxResult:
    return run_program(code, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- resource attacks


def test_infinite_loop(canary):
    with attack("infinite loop", canary):
        res = _run("while True:\n    pass", timeout_s=1)
        assert res.status == "timeout" and res.duration_s >= 1


def test_fork_bomb(canary):
    marker = f"forkbomb-{secrets.token_hex(8)}"
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass\n")
    code = (f"import os, sys\nos.execv(sys.executable, "
            f"[sys.executable, '-c', {bomb!r}, {marker!r}])\n")
    with attack("fork bomb", canary):
        res = _run(code, timeout_s=1.5, max_procs=16)
        assert res.status == "timeout"
        _assert_no_process_with(marker)


def test_memory_bomb(canary):
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 2**20))\n"
    with attack("memory bomb", canary):
        res = _run(code, memory_mb=256, timeout_s=5)
        assert res.status == "failed" and res.reason == "MemoryError"


def test_huge_output(canary):
    code = ("import os, sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n"
            "    os.write(2, b'B' * 65536)\n")
    with attack("huge output", canary):
        res = _run(code, max_output_bytes=100_000, timeout_s=5)
        assert res.status == "failed" and res.truncated and "output limit" in res.reason
        assert len(res.stdout) <= 100_000 and len(res.stderr) <= 100_000


def test_disk_fill(canary):
    code = ("n = 0\ntry:\n    while True:\n        with open(f'f{n}', 'wb') as f:\n"
            "            f.write(b'0' * 2**20)\n        n += 1\nexcept OSError as e:\n"
            "    print(n, e)\n    raise\n")
    with attack("disk fill", canary):
        res = _run(code, tmpfs_mb=16, timeout_s=5)
        assert res.status == "failed" and "No space left" in res.reason
        assert int(res.stdout.split()[0]) <= 16


# --------------------------------------------------------------------------- filesystem


@pytest.fixture()
def sentinels(tmp_path: Path) -> Iterator[list[Path]]:
    """A file in a host temp dir and one in the project dir, both of known content."""
    files = [tmp_path / "sentinel.txt", PROJECT / f".sandbox-sentinel-{secrets.token_hex(6)}"]
    for f in files:
        f.write_text("original")
    yield files
    for f in files:
        f.unlink(missing_ok=True)


def test_write_and_delete_outside_the_temp_dir(canary, sentinels):
    victims = [*map(str, sentinels), "/usr/lib/posttrain-attack", "/etc/posttrain-attack"]
    code = (
        "import os, shutil\n"
        f"for p in {victims!r}:\n"
        "    for act in (lambda: open(p, 'w').write('pwned'), lambda: os.remove(p),\n"
        "                lambda: open(p + '.new', 'w').write('x'),\n"
        "                lambda: shutil.rmtree(os.path.dirname(p))):\n"
        "        try:\n            act()\n            print('DID', p)\n"
        "        except OSError as e:\n            print('blocked', type(e).__name__)\n")
    with attack("write/delete host files", canary):
        res = _run(code)
        assert res.passed and "DID" not in res.stdout, res.stdout
        for f in sentinels:
            assert f.read_text() == "original"
            assert not Path(str(f) + ".new").exists()
        assert sorted(p.name for p in sentinels[0].parent.iterdir()) == ["sentinel.txt"]
        for extra in ("/usr/lib/posttrain-attack", "/etc/posttrain-attack"):
            assert not Path(extra).exists()


def test_read_host_secrets(canary, monkeypatch):
    token = secrets.token_hex(16)
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", token)
    secret_files = [PROJECT / f".sandbox-secret-{token[:6]}", Path.home() / f".secret-{token[:6]}"]
    for f in secret_files:
        f.write_text(token)
    paths = [*map(str, secret_files), str(PROJECT / "pyproject.toml"),
             f"/proc/{os.getpid()}/environ", "/proc/1/environ", "/proc/self/environ"]
    code = (
        "import os\nprint(dict(os.environ))\n"
        f"for d in ('/root', {str(PROJECT)!r}, {str(Path.home())!r}):\n"
        "    try:\n        print('LIST', d, os.listdir(d))\n"
        "    except OSError as e:\n        print(d, type(e).__name__)\n"
        f"for p in {paths!r}:\n"
        "    try:\n        print(p, open(p, 'rb').read()[:4000])\n"
        "    except OSError as e:\n        print(p, type(e).__name__)\n")
    try:
        with attack("read host secrets", canary):
            res = _run(code)
            seen = res.stdout + res.stderr
            assert res.passed and token not in seen
            assert "POSTTRAIN_TEST_SECRET" not in seen
            assert 'name = "posttrain"' not in seen  # pyproject.toml's content
            listings = [ln for ln in res.stdout.splitlines() if ln.startswith("LIST")]
            assert not any(f.name in ln for ln in listings for f in secret_files), listings
            assert "FileNotFoundError" in res.stdout  # the project is simply not there
    finally:
        for f in secret_files:
            f.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ network


def test_connect_to_host_loopback(canary):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    abstract = f"\0posttrain-test-{secrets.token_hex(6)}"
    usrv = socket.socket(socket.AF_UNIX)
    usrv.bind(abstract)
    usrv.listen(4)
    usrv.settimeout(0.2)
    accepted: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            for s, name in ((srv, "tcp"), (usrv, "unix")):
                with contextlib.suppress(OSError):
                    conn, _ = s.accept()
                    accepted.append(name)
                    conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    code = (
        "import socket\n"
        f"targets = [('tcp', ('127.0.0.1', {port})), ('tcp', ('1.1.1.1', 53)),\n"
        f"           ('unix', {abstract!r})]\n"
        "for kind, addr in targets:\n"
        "    fam = socket.AF_INET if kind == 'tcp' else socket.AF_UNIX\n"
        "    s = socket.socket(fam)\n    s.settimeout(1)\n"
        "    try:\n        s.connect(addr)\n        print('CONNECTED', addr)\n"
        "    except OSError as e:\n        print('refused', type(e).__name__)\n")
    try:
        with attack("connect to host loopback", canary):
            res = _run(code)
            time.sleep(0.3)  # give a (wrongly) accepted connection time to be seen
            assert res.passed and "CONNECTED" not in res.stdout, res.stdout
            assert res.stdout.count("refused") == 3
            assert accepted == []
    finally:
        stop.set()
        t.join()
        srv.close()
        usrv.close()


# ---------------------------------------------------------------------------- processes


def test_kill_the_parent(canary):
    targets = [f"os.kill({os.getpid()}, 9)", f"os.kill({canary.pid}, 9)",
               "os.kill(os.getppid(), 9)", "os.killpg(os.getpgid(os.getppid()), 9)",
               "os.kill(1, 9)", "os.kill(-1, 9)"]
    code = "import os\n" + "".join(
        f"try:\n    {t}\n    print('sent', {t!r})\nexcept OSError as e:\n"
        f"    print('blocked', {t!r}, type(e).__name__)\n" for t in targets) + "print('end')\n"
    with attack("kill the parent", canary):
        res = _run(code)
        assert res.status in ("passed", "failed")
        # we are still here, and so is the canary: checked by attack()


def test_kill_own_process_group(canary):
    with attack("kill own process group", canary):
        res = _run("import os\nos.killpg(0, 9)")
        assert res.status == "failed" and res.reason == "killed by SIGKILL"


def _detach_code(marker: str, parent_sleep: float) -> str:
    child = "print('CHILD-UP', flush=True)\nimport time\ntime.sleep(120)"
    return (
        "import os, sys, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', {child!r}, {marker!r}])\n"
        "    os._exit(0)\n"
        f"time.sleep({parent_sleep})\nprint('parent done')\n")


@pytest.mark.parametrize("parent_sleep, status", [(0.5, "passed"), (30, "timeout")],
                         ids=["parent-exits", "parent-hangs"])
def test_detached_child_does_not_survive(canary, parent_sleep, status):
    marker = f"detached-{secrets.token_hex(8)}"
    with attack(f"detached child ({status})", canary):
        res = _run(_detach_code(marker, parent_sleep), timeout_s=1.5)
        assert res.status == status
        assert "CHILD-UP" in res.stdout  # the detached grandchild really ran
        _assert_no_process_with(marker)


def test_privilege_escalation(canary):
    code = ("import os\nprint('uid', os.getuid())\n"
            "for f in (lambda: os.setuid(0), lambda: os.chroot('/tmp'),\n"
            "          lambda: os.mknod('/tmp/disk', 0o600 | 0o060000, os.makedev(8, 0))):\n"
            "    try:\n        f()\n        print('ESCALATED')\n"
            "    except OSError as e:\n        print('blocked', type(e).__name__)\n")
    with attack("privilege escalation", canary):
        res = _run(code)
        assert res.passed and "ESCALATED" not in res.stdout, res.stdout
        if os.geteuid() == 0:  # as root on the host, the program still is not root
            assert "uid 0\n" not in res.stdout
