"""What a sandboxed run may use (SandboxConfig) and what it did (SandboxResult)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.errors import ConfigError

Isolation = Literal["auto", "bwrap", "limits-only"]
Status = Literal["passed", "failed", "timeout", "error"]
ISOLATIONS: tuple[str, ...] = ("auto", "bwrap", "limits-only")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one program. Every limit is always on; none can be switched off.

    ``timeout_s``: wall-clock deadline; at it the whole process tree is killed.
    ``memory_mb``: address-space limit (RLIMIT_AS) of every process in the sandbox.
    ``max_procs``: processes + threads the program may have at once (RLIMIT_NPROC, see
        docs/sandbox.md for how it is made per-run).
    ``max_output_bytes``: stdout and stderr each; a program that writes more is killed.
    ``max_file_mb``: largest file the program may write (RLIMIT_FSIZE).
    ``tmpfs_mb``: size of the private writable /tmp (and /dev/shm).
    ``max_open_files``: RLIMIT_NOFILE.
    ``isolation``: ``auto``/``bwrap`` need bubblewrap and refuse to run without it;
        ``limits-only`` is an explicit, loudly logged opt-in to resource limits alone.
    ``site_packages``: expose the interpreter's site-packages (read-only); off by default,
        which keeps the program to the standard library and makes start-up ~4x faster.
    ``python``: interpreter for the program; default: the one running posttrain. Another
        interpreter's prefix (two levels above its binary) is bound read-only, and without
        ``site_packages`` it runs with ``-S``.
    """

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_procs: int = 32
    max_output_bytes: int = 64 * 1024
    max_file_mb: int = 16
    tmpfs_mb: int = 64
    max_open_files: int = 256
    isolation: Isolation = "auto"
    site_packages: bool = False
    python: str | None = None

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ConfigError(
                f"sandbox isolation must be one of {', '.join(ISOLATIONS)}, got {self.isolation!r}"
            )
        for name in ("timeout_s", "memory_mb", "max_procs", "max_output_bytes", "max_file_mb",
                     "tmpfs_mb", "max_open_files"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"sandbox {name} must be > 0, got {getattr(self, name)!r}")

    def replace(self, **overrides: Any) -> SandboxConfig:
        """A copy with some fields changed; unknown names raise ConfigError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown sandbox option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one run.

    ``status``: ``passed`` (exit code 0), ``failed`` (non-zero exit, uncaught exception,
    killed by a limit such as memory or output), ``timeout`` (wall-clock or CPU deadline) or
    ``error`` (the sandbox itself could not run the program; not the program's fault).
    ``stdout``/``stderr`` hold at most ``max_output_bytes`` each (``truncated`` says if cut).
    ``reason`` is a one-line explanation, e.g. ``AssertionError`` or ``output limit exceeded``.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    isolation: str
    reason: str
    truncated: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
