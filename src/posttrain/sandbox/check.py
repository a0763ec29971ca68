"""What isolation this machine offers: :func:`check_isolation` (``posttrain sandbox check``)."""

from __future__ import annotations

import os
import sys
from typing import Any

from posttrain.sandbox.bwrap import bwrap_version, find_bwrap, python_roots
from posttrain.sandbox.runner import probe_bwrap


def check_isolation() -> dict[str, Any]:
    """A JSON-able report: is bubblewrap present and working, and which layers apply.

    ``isolation`` is what ``isolation="auto"`` will use: ``"bwrap"``, or ``"none"`` when
    runs will be refused (unless ``limits-only`` is chosen explicitly).
    """
    bwrap = find_bwrap()
    as_root = os.geteuid() == 0
    report: dict[str, Any] = {
        "bwrap_path": bwrap,
        "bwrap_version": ".".join(map(str, bwrap_version(bwrap))) if bwrap else None,
        "bwrap_works": False,
        "bwrap_error": "bwrap not found" if bwrap is None else None,
        "running_as_root": as_root,
        "python": sys.executable,
        "python_mounts": python_roots(),
    }
    if bwrap is not None:
        report["bwrap_error"] = probe_bwrap(bwrap)
        report["bwrap_works"] = report["bwrap_error"] is None
    report["isolation"] = "bwrap" if report["bwrap_works"] else "none"
    report["layers"] = _layers(report["bwrap_works"], as_root)
    return report


def _layers(bwrap_ok: bool, as_root: bool) -> list[str]:
    layers = ["own session and process group; wall-clock kill of the whole group",
              "rlimits: CPU, address space, file size, open files, no core dumps",
              "output capped while reading the pipes",
              "scrubbed environment"]
    if as_root:
        layers.append("program runs as a fresh unprivileged uid (RLIMIT_NPROC per run)")
    if bwrap_ok:
        layers += ["bubblewrap: new pid, network, ipc, uts, cgroup namespaces"
                   + ("" if as_root else ", user namespace"),
                   "allow-listed read-only filesystem; private size-limited tmpfs /tmp",
                   "pid namespace teardown kills detached (setsid / double-fork) children"]
        if not as_root:
            layers.append("RLIMIT_NPROC counted per sandbox inside its user namespace")
    return layers
