"""Run one untrusted Python program under a deadline, with capped output: :func:`run_program`.

Process layout (bubblewrap mode)::

    this thread --Popen(new session)--> bwrap --> [pid ns] bwrap init (pid 1)
                                                     --> python -I -S -c <launcher>
                                                         (rlimits, drop to a fresh uid)
                                                         --exec--> python -I main.py

Killing the process group at the deadline kills the outer bwrap; ``--die-with-parent`` then
kills the namespace's pid 1, and the kernel kills every process left in the pid namespace,
including ones that called setsid() or double-forked out of the process group.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pwd
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.sandbox.bwrap import SANDBOX_ENV, bwrap_command, find_bwrap, parents
from posttrain.sandbox.config import SandboxConfig, SandboxResult, Status

log = logging.getLogger("posttrain")

LAUNCH_MARK = "posttrain-sandbox:"
LAUNCH_FAILED_RC = 125
MAIN = "main.py"
_CHUNK = 65536
_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
         "bubblewrap), or pass isolation='limits-only' (CLI: --isolation limits-only) to accept "
         "resource limits alone, without filesystem, network or process isolation")


class SandboxUnavailableError(PosttrainError):
    """The requested isolation cannot be provided on this machine."""


@functools.cache
def _launcher_source() -> str:
    return Path(__file__).with_name("_launch.py").read_text()


# ---------------------------------------------------------------------------------- isolation


_WORKING_BWRAP: set[str] = set()


def probe_bwrap(bwrap: str) -> str | None:
    """None if bwrap can run a program here, else bwrap's complaint. Only success is
    cached, so a failure under transient load is retried on the next call."""
    if bwrap in _WORKING_BWRAP:
        return None
    res = _run_bwrap(bwrap, "print('ok')", SandboxConfig(timeout_s=30.0), None)
    if res.status == "passed" and res.stdout.strip() == "ok":
        _WORKING_BWRAP.add(bwrap)
        return None
    return (res.stderr.strip() or res.reason)[:500]


_warned_limits_only = False


def _warn_limits_only() -> None:
    global _warned_limits_only
    if not _warned_limits_only:
        _warned_limits_only = True
        log.warning(
            "SANDBOX WARNING: isolation='limits-only' was chosen. Untrusted code runs with "
            "resource limits only: it CAN read host files, use the network and signal your "
            "processes. Use bubblewrap for anything model-written.")


def resolve_isolation(isolation: str) -> tuple[str, str | None]:
    """('bwrap', path) or ('limits-only', None); raises SandboxUnavailableError to refuse."""
    if isolation == "limits-only":
        _warn_limits_only()
        return "limits-only", None
    bwrap = find_bwrap()
    if bwrap is None:
        raise SandboxUnavailableError(f"sandbox: bubblewrap (bwrap) not found; {_HINT}")
    problem = probe_bwrap(bwrap)
    if problem is not None:
        raise SandboxUnavailableError(f"sandbox: bubblewrap cannot run here ({problem}); {_HINT}")
    return "bwrap", bwrap


# -------------------------------------------------------------------------------- public API


def make_config(config: SandboxConfig | None, overrides: dict[str, Any]) -> SandboxConfig:
    cfg = config or SandboxConfig()
    return cfg.replace(**overrides) if overrides else cfg


def run_program(code: str, *, stdin: str | None = None, config: SandboxConfig | None = None,
                **overrides: Any) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh sandbox and report what happened.

    Keyword overrides are :class:`SandboxConfig` fields, e.g. ``run_program(code,
    timeout_s=2, memory_mb=256)``. Never raises for anything the program does; raises
    :class:`SandboxUnavailableError` when the requested isolation is unavailable.
    """
    cfg = make_config(config, overrides)
    _, bwrap = resolve_isolation(cfg.isolation)
    if bwrap is not None:
        return _run_bwrap(bwrap, code, cfg, stdin)
    return _run_limits_only(code, cfg, stdin)


# ------------------------------------------------------------------------------- one process


@dataclass
class _Output:
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    timed_out: bool = False
    overflow: str | None = None


class _UidPool:
    """Fresh, unused uids (2**30 and up) so that RLIMIT_NPROC counts one run's processes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: set[int] = set()

    def take(self) -> int:
        with self._lock:
            while True:
                uid = (1 << 30) + secrets.randbelow(1 << 30)
                if uid in self._used:
                    continue
                try:
                    pwd.getpwuid(uid)
                except KeyError:
                    self._used.add(uid)
                    return uid

    def give(self, uid: int) -> None:
        with self._lock:
            self._used.discard(uid)


_UIDS = _UidPool()


@contextlib.contextmanager
def _run_uid() -> Iterator[int]:
    """A fresh uid when we are root (-1 otherwise: the launcher then keeps our uid)."""
    if os.geteuid() != 0:
        yield -1
        return
    uid = _UIDS.take()
    try:
        yield uid
    finally:
        _UIDS.give(uid)


def _launcher_argv(cfg: SandboxConfig, uid: int, nproc: int, site: bool) -> list[str]:
    py = cfg.python or sys.executable
    cpu = int(cfg.timeout_s) + 1
    limits = [uid, nproc, cfg.memory_mb << 20, cpu, cfg.max_file_mb << 20, cfg.max_open_files]
    program = [py, "-I", MAIN] if site else [py, "-I", "-S", MAIN]
    return [py, "-I", "-S", "-c", _launcher_source(), *map(str, limits), "--", *program]


@contextlib.contextmanager
def _code_fd(code: str) -> Iterator[int]:
    # A memfd avoids a host temp file; bwrap copies it into the sandbox's /tmp/main.py.
    fd = os.memfd_create("posttrain-main.py")
    try:
        os.write(fd, code.encode("utf-8", errors="surrogatepass"))
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _run_bwrap(bwrap: str, code: str, cfg: SandboxConfig, stdin: str | None) -> SandboxResult:
    with _run_uid() as uid, _code_fd(code) as fd:
        # Our own interpreter's site-packages are hidden by a tmpfs unless asked for, so it
        # keeps `site` (exit(), quit()) at no cost; other interpreters get -S instead.
        site = cfg.python is None or cfg.site_packages
        inner = _launcher_argv(cfg, uid, cfg.max_procs, site=site)
        argv = bwrap_command(bwrap, inner, code_fd=fd, cfg=cfg, as_root=uid >= 0)
        return _execute(argv, cfg, stdin, "bwrap", pass_fds=(fd,), cwd="/")


def _check_reachable(python: str) -> None:
    """As root, limits-only runs the program as a fresh uid: it must be able to exec python."""
    exe = os.path.realpath(python)
    for p in [*parents(exe), exe]:
        if not os.stat(p).st_mode & stat.S_IXOTH:
            raise SandboxUnavailableError(
                f"sandbox: limits-only mode runs the program as an unprivileged uid, which "
                f"cannot reach the interpreter {exe} ({p} is not world-searchable); "
                f"install bubblewrap, or pass python= an interpreter such as /usr/bin/python3")


def _run_limits_only(code: str, cfg: SandboxConfig, stdin: str | None) -> SandboxResult:
    python = cfg.python or sys.executable
    if os.geteuid() == 0:
        _check_reachable(python)
    workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    try:
        Path(workdir, MAIN).write_text(code, encoding="utf-8", errors="surrogatepass")
        with _run_uid() as uid:
            if uid >= 0:
                os.chown(workdir, uid, uid)
            # Without a user namespace RLIMIT_NPROC counts all of our uid's processes.
            nproc = cfg.max_procs if uid >= 0 else _count_processes(os.getuid()) + cfg.max_procs
            inner = _launcher_argv(cfg, uid, nproc, site=cfg.site_packages)
            env = {**SANDBOX_ENV, "HOME": workdir, "TMPDIR": workdir}
            try:
                return _execute(inner, cfg, stdin, "limits-only", cwd=workdir, env=env)
            finally:
                if uid >= 0:
                    _kill_uid(uid, python)  # detached children left the process group
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _execute(argv: list[str], cfg: SandboxConfig, stdin: str | None, isolation: str,
             *, cwd: str, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None
             ) -> SandboxResult:
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds, cwd=cwd,
            env=env if env is not None else dict(SANDBOX_ENV), start_new_session=True)
    except OSError as e:  # e.g. EAGAIN from fork under host memory pressure
        return SandboxResult("error", None, "", "", 0.0, isolation, f"could not start: {e}")
    try:
        got = _collect(proc, stdin, t0 + cfg.timeout_s, cfg.max_output_bytes)
    finally:
        # The leader is not reaped yet, so its pgid cannot have been reused: safe to kill.
        _kill_group(proc.pid)
        rc = proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    return _result(rc, got, time.monotonic() - t0, isolation, cfg)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_uid(uid: int, python: str) -> None:
    """SIGKILL every process of ``uid`` (limits-only mode, as root): kill(-1) as that uid."""
    code = "import os\ntry:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\n"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([python, "-I", "-S", "-c", code], user=uid, group=uid,
                       extra_groups=[], timeout=10, env={}, cwd="/")


def _count_processes(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if d.isdigit() and os.stat(f"/proc/{d}").st_uid == uid:
                n += 1
    return n


# ------------------------------------------------------------------------------------ output


def _collect(proc: subprocess.Popen[bytes], stdin: str | None, deadline: float,
             cap: int) -> _Output:
    """Read stdout/stderr (at most ``cap`` bytes each) and feed stdin until the process
    exits, the deadline passes or a stream overflows."""
    got = _Output()
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, got.out)
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, got.err)
    pending = _register_stdin(sel, proc, stdin)
    exited = _register_exit(sel, proc.pid)
    try:
        _pump(sel, proc, got, deadline, cap, pending, exited)
    finally:
        sel.close()
        if exited is not None:
            os.close(exited)
    return got


def _register_stdin(sel: selectors.BaseSelector, proc: subprocess.Popen[bytes],
                    stdin: str | None) -> bytearray:
    if stdin is None or proc.stdin is None:
        return bytearray()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
    return bytearray(stdin.encode("utf-8", errors="surrogatepass"))


def _register_exit(sel: selectors.BaseSelector, pid: int) -> int | None:
    # A pidfd becomes readable when the process exits, without reaping it.
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    sel.register(fd, selectors.EVENT_READ, "exit")
    return fd


def _pump(sel: selectors.BaseSelector, proc: subprocess.Popen[bytes], got: _Output,
          deadline: float, cap: int, pending: bytearray, exit_fd: int | None) -> None:
    streams, exited = 2, False
    while not got.overflow and (streams or not exited):
        left = deadline - time.monotonic()
        if left <= 0:
            got.timed_out = True
            return
        # After exit only drain what is ready: a detached child may hold the pipes open.
        # Without a pidfd, poll for exit every 10 ms.
        wait = 0.0 if exited else left if exit_fd is not None else min(left, 0.01)
        events = sel.select(wait)
        if exited and not any(isinstance(k.data, bytearray) for k, _ in events):
            return
        for key, _ in events:
            if key.data == "exit":
                exited = True
                sel.unregister(key.fd)
            elif key.data == "stdin":
                _feed(sel, proc, key.fd, pending)
            else:
                streams -= _read(sel, key.fd, key.data, got, cap)
        if exit_fd is None and not exited:
            exited = _has_exited(proc.pid)


def _feed(sel: selectors.BaseSelector, proc: subprocess.Popen[bytes], fd: int,
          pending: bytearray) -> None:
    try:
        del pending[: os.write(fd, pending[:_CHUNK])]
    except BlockingIOError:
        return
    except BrokenPipeError:
        pending.clear()  # the program stopped reading its input: not an error
    if not pending:
        sel.unregister(fd)
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()


def _read(sel: selectors.BaseSelector, fd: int, buf: bytearray, got: _Output, cap: int) -> int:
    """Read one chunk into ``buf``; 1 when the stream reached EOF, else 0."""
    chunk = os.read(fd, _CHUNK)
    if not chunk:
        sel.unregister(fd)
        return 1
    room = cap - len(buf)
    buf += chunk[: max(room, 0)]
    if len(chunk) > room:
        name = "stdout" if buf is got.out else "stderr"
        got.overflow = f"output limit exceeded ({name} > {cap} bytes)"
    return 0


def _has_exited(pid: int) -> bool:
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


# ------------------------------------------------------------------------------------ result


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _signal_of(rc: int, isolation: str) -> int | None:
    if rc < 0:
        return -rc
    # bwrap's init exits with 128 + signal when the program was killed by a signal.
    if isolation == "bwrap" and 128 < rc < 128 + signal.NSIG:
        return rc - 128
    return None


def _classify(rc: int, got: _Output, stderr: str, isolation: str,
              cfg: SandboxConfig) -> tuple[Status, str]:
    if got.timed_out:
        return "timeout", f"wall-clock limit of {cfg.timeout_s:g} s exceeded"
    if got.overflow:
        return "failed", got.overflow
    if rc == LAUNCH_FAILED_RC and LAUNCH_MARK in stderr:
        return "error", _last_line(stderr)
    if isolation == "bwrap" and rc == 1 and stderr.startswith("bwrap:"):
        return "error", stderr.strip().splitlines()[0][:300]
    if rc == 0:
        return "passed", "exit code 0"
    sig = _signal_of(rc, isolation)
    if sig == signal.SIGXCPU:
        return "timeout", f"CPU time limit of {int(cfg.timeout_s) + 1} s exceeded"
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        return "failed", f"killed by {name}"
    return "failed", _last_line(stderr) or f"exit code {rc}"


def _result(rc: int, got: _Output, duration: float, isolation: str,
            cfg: SandboxConfig) -> SandboxResult:
    out = got.out.decode("utf-8", errors="replace")
    err = got.err.decode("utf-8", errors="replace")
    status, reason = _classify(rc, got, err, isolation, cfg)
    return SandboxResult(status, rc, out, err, round(duration, 4), isolation, reason,
                         truncated=got.overflow is not None)
