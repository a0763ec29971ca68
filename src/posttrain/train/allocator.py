"""Host memory for CPU training: steps should reuse warm pages, not fault in fresh ones.

A CPU training step allocates and frees the same large tensors every step (logits and their
gradient, activations, gradients). glibc serves blocks above ``M_MMAP_THRESHOLD`` with a fresh
``mmap``, unmaps them on free, and its heap fragments under a step's mix of sizes, so steps
keep faulting in fresh, zero-filled pages; on a VM whose memory the host backs lazily a first
touch of a page costs ~38 us.

The remedy is a size-class allocator (tcmalloc, else jemalloc) preloaded at start and told
never to return freed memory to the OS. An allocator can only be chosen before the process
starts, so the ``posttrain`` command re-executes itself once with ``LD_PRELOAD`` set
(``reexec_with_allocator``; ``POSTTRAIN_ALLOCATOR`` = ``auto`` (default: tcmalloc, else
jemalloc, else glibc), ``tcmalloc``, ``jemalloc`` or ``glibc``). Python API users get the same
with ``allocator_env()``'s variables in their own process's environment (docs/training.md).

Under glibc, ``keep_freed_memory()`` sets through ``mallopt`` what ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647`` set at start-up: no mmap for large blocks, never trim the
heap, so freed memory stays in the heap for the next step (fewer fresh pages, not none).
``POSTTRAIN_MALLOC_TUNING=0`` keeps glibc's defaults. Measurements: benchmarks/README.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("posttrain")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for repeated large allocations (see the module doc); returns
    whether it is now in effect. Idempotent; a no-op off Linux/glibc or when disabled."""
    global _done
    if _done:
        return True
    if sys.platform != "linux" or os.environ.get("POSTTRAIN_MALLOC_TUNING", "1") == "0":
        return False
    if preloaded_allocator():
        return False  # glibc's heap is not the one in use
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # absent in musl
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
    if not _done:
        log.debug("mallopt refused the allocator settings; keeping glibc's defaults")
    return _done


# ---- a preloaded size-class allocator ------------------------------------------------------

ALLOCATOR_LIBS = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
# Both never hand freed memory back to the OS here: the point is that steps reuse warm pages.
ALLOCATOR_SETTINGS = {
    "tcmalloc": {"TCMALLOC_RELEASE_RATE": "0",
                 "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)},
    "jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"},
}
CHOICE_VAR = "POSTTRAIN_ALLOCATOR"
_REEXEC_GUARD = "_POSTTRAIN_ALLOCATOR_REEXEC"


def _lib_dirs() -> list[Path]:
    dirs = [Path(sys.prefix) / "lib", Path("/usr/local/lib")]
    dirs += sorted(Path("/usr/lib").glob("*-linux-gnu")) + [Path("/usr/lib64"), Path("/usr/lib")]
    return dirs


def find_allocator(choice: str = "auto",
                   dirs: list[Path] | None = None) -> tuple[str, Path] | None:
    """``(name, library path)`` of the allocator ``choice`` selects, or None (glibc).

    ``auto`` takes tcmalloc, else jemalloc, whichever is installed (Debian/Ubuntu:
    ``apt-get install libtcmalloc-minimal4``); ``glibc`` always gives None. An explicit
    ``tcmalloc``/``jemalloc`` that is not installed raises ``ValueError``."""
    choice = choice.strip().lower() or "auto"
    if choice == "glibc":
        return None
    if choice != "auto" and choice not in ALLOCATOR_LIBS:
        raise ValueError(f"{CHOICE_VAR}={choice!r}: expected auto, tcmalloc, jemalloc or glibc")
    names = list(ALLOCATOR_LIBS) if choice == "auto" else [choice]
    search = dirs if dirs is not None else _lib_dirs()
    for name in names:
        for d in search:
            for lib in ALLOCATOR_LIBS[name]:
                if (d / lib).is_file():
                    return name, d / lib
    if choice != "auto":
        raise ValueError(f"{CHOICE_VAR}={choice}: none of {ALLOCATOR_LIBS[choice]} is installed "
                         f"(looked in {', '.join(map(str, search))})")
    return None


@functools.cache  # a preload is decided when the process starts
def preloaded_allocator() -> str | None:
    """The size-class allocator mapped into this process, if any (Linux ``/proc``)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return next((name for name, libs in ALLOCATOR_LIBS.items()
                 if any(lib.split(".so")[0] + ".so" in maps for lib in libs)), None)


def allocator_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to add to ``environ`` (default ``os.environ``) so a new process starts
    with the allocator ``POSTTRAIN_ALLOCATOR`` selects: ``LD_PRELOAD`` (prepended to any
    existing one) and the allocator's keep-memory settings; empty when glibc is chosen, none
    is installed, or ``LD_PRELOAD`` already names that library."""
    environ = os.environ if environ is None else environ
    if sys.platform != "linux":
        return {}
    found = find_allocator(environ.get(CHOICE_VAR, "auto"))
    if found is None:
        return {}
    name, lib = found
    preload = environ.get("LD_PRELOAD", "")
    if str(lib) in preload.replace(":", " ").split():
        return {}
    settings = {k: v for k, v in ALLOCATOR_SETTINGS[name].items() if k not in environ}
    return {"LD_PRELOAD": f"{lib} {preload}".strip(), **settings}


def reexec_with_allocator(argv: list[str] | None = None) -> None:
    """Replace this process by itself with ``allocator_env()`` applied (see the module doc);
    returns without doing anything when there is nothing to add, or once re-executed."""
    if os.environ.get(_REEXEC_GUARD):
        return
    try:
        extra = allocator_env()
    except ValueError as e:
        log.warning("%s; keeping glibc's allocator", e)
        return
    if not extra:
        return
    env = {**os.environ, **extra, _REEXEC_GUARD: "1"}
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def _start_hint() -> str:
    """How a glibc process would start under the installed allocator ('' if none)."""
    try:
        extra = allocator_env()
    except ValueError:
        return ""
    settings = " ".join(f"{k}='{v}'" for k, v in extra.items())
    return (f"; CPU steps run faster with {settings} set when Python starts (the posttrain "
            "command does this itself)") if extra else ""


@functools.cache
def use_warm_host_memory() -> str:
    """Called by the engine on CPU: the allocator in use (``tcmalloc``, ``jemalloc`` or
    ``glibc``), logged once per process. Under glibc it applies ``keep_freed_memory()`` and
    tells a Python API user how to start with an installed size-class allocator instead."""
    name = preloaded_allocator()
    if name:
        log.info("host allocator: %s", name)
        return name
    keep_freed_memory()
    log.info("host allocator: glibc%s", _start_hint())
    return "glibc"
