"""The bubblewrap command line: namespaces, an allow-listed read-only filesystem, a private /tmp.

The sandbox's root is an empty tmpfs. Only what a Python interpreter needs is bound into it,
read-only: the system directories (/usr and the /bin, /lib... links), the dynamic linker's
config from /etc, and the interpreter's own prefix. Everything else of the host (the project,
/root, /home, /run with its sockets, /var, the host's /tmp) simply does not exist inside.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig

from posttrain.sandbox.config import SandboxConfig

# Read-only system trees; on merged-/usr systems all but /usr are symlinks, recreated as such.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# /etc holds secrets on some hosts (keys, tokens, shadow): bind only the linker's files.
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
             "/etc/alternatives")
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}
WORKDIR = "/tmp"
PROGRAM = "/tmp/main.py"

# As root, a user namespace would keep the kernel uid 0, which RLIMIT_NPROC exempts; so we
# unshare everything else and drop to a fresh uid in the launcher instead (docs/sandbox.md).
ROOT_NAMESPACES = ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                   "--unshare-cgroup-try")
USER_NAMESPACES = ("--unshare-all", "--unshare-user")


def find_bwrap() -> str | None:
    """Path of the bwrap binary, or None."""
    return shutil.which("bwrap") or next(
        (p for p in ("/usr/bin/bwrap", "/bin/bwrap") if os.access(p, os.X_OK)), None)


@functools.cache
def bwrap_version(bwrap: str) -> tuple[int, ...]:
    """(major, minor, patch) of ``bwrap --version``; (0,) when it cannot be read."""
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return (0,)
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    return tuple(int(g or 0) for g in m.groups()) if m else (0,)


def _under(path: str, roots: tuple[str, ...] | list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def parents(path: str) -> list[str]:
    """Ancestors of ``path`` from the top, excluding "/" and ``path`` itself."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _mkdirs(path: str) -> list[str]:
    # bwrap creates missing parents with mode 0700, which the dropped uid could not traverse.
    # The work dir is already a world-writable tmpfs: leave it as it is.
    args: list[str] = []
    for p in parents(path):
        if p != WORKDIR:
            args += ["--perms", "0755", "--dir", p]
    return args


def _system_mounts() -> list[str]:
    args: list[str] = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    etc = [f for f in ETC_FILES if os.path.exists(f)]
    if etc:
        args += ["--perms", "0755", "--dir", "/etc"]
    for f in etc:
        args += ["--ro-bind", f, f]
    return args


def python_roots(python: str | None = None) -> list[str]:
    """Directories holding the interpreter (venv and base prefix) outside the system dirs.

    ``python`` None means the running interpreter, whose prefixes are known exactly; for
    another one, the directory two levels above its binary (``PREFIX/bin/python``).
    """
    if python is None:
        roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                               sys.base_exec_prefix)}
        exe = os.path.realpath(sys.executable)
        if not _under(exe, sorted(roots)):
            roots.add(os.path.dirname(os.path.dirname(exe)))
    else:
        roots = {os.path.dirname(os.path.dirname(p))
                 for p in (os.path.abspath(python), os.path.realpath(python))}
    roots = {r for r in roots if r != "/" and not _under(r, SYSTEM_DIRS)}
    # Drop roots nested in another root: binding the outer one covers them.
    return sorted(r for r in roots if not _under(r, [o for o in roots if o != r]))


def _site_dirs() -> list[str]:
    dirs = set(site.getsitepackages())
    for base in {sys.prefix, sys.base_prefix}:
        paths = sysconfig.get_paths(vars={"base": base, "platbase": base})
        dirs |= {paths["purelib"], paths["platlib"]}
    return sorted(d for d in dirs if os.path.isdir(d))


def _python_mounts(python: str | None, site_packages: bool) -> list[str]:
    args: list[str] = []
    for root in python_roots(python):
        args += [*_mkdirs(root), "--ro-bind", root, root]
    if python is None and not site_packages:
        # An empty tmpfs over site-packages: stdlib only, and no .pth files to run at start-up.
        for d in _site_dirs():
            args += ["--tmpfs", d]
    return args


def bwrap_command(bwrap: str, inner: list[str], *, code_fd: int, cfg: SandboxConfig,
                  as_root: bool) -> list[str]:
    """The full ``bwrap ... -- inner`` argv; the program's source is read from ``code_fd``."""
    version = bwrap_version(bwrap)
    args = [bwrap, *(ROOT_NAMESPACES if as_root else USER_NAMESPACES)]
    if not as_root and version >= (0, 8):
        args.append("--disable-userns")  # no nested user namespaces: less kernel surface
    args += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv"]
    for k, v in SANDBOX_ENV.items():
        args += ["--setenv", k, v]
    size = ["--size", str(cfg.tmpfs_mb << 20)] if version >= (0, 7) else []
    # The work dir's tmpfs goes first: an interpreter under /tmp (a venv made there) is then
    # bound on top of it instead of hidden beneath it.
    args += _system_mounts() + ["--perms", "1777", *size, "--tmpfs", WORKDIR]
    args += _python_mounts(cfg.python, cfg.site_packages)
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", *size, "--tmpfs", "/dev/shm",
             "--perms", "0644", "--file", str(code_fd), PROGRAM, "--chdir", WORKDIR]
    if as_root:
        # Only so that the launcher can switch to the fresh uid; the switch clears them.
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return [*args, "--", *inner]
