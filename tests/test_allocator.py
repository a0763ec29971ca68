"""The CPU allocator tuning (``posttrain.train.allocator``): large blocks come from the heap,
not from fresh mmaps, and freed ones stay in the process (the heap is never trimmed), so a
training loop's next step can reuse them. Observed directly: a 64 MiB tensor's storage lies
inside the ``[heap]`` mapping only when tuned, and the program break does not move back when
it is freed. (An earlier version asserted that the break grew by the full 64 MiB, which failed
by a few KiB whenever the heap's top already had free slack.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.train import allocator

PROBE = """
import ctypes, json, torch
from posttrain.train.allocator import keep_freed_memory
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]
enabled = keep_freed_memory()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest mmap threshold
heap = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
heap_start, heap_end = (int(a, 16) for a in heap.split()[0].split("-"))
ptr = x.data_ptr()
in_heap = heap_start <= ptr and ptr + x.nbytes <= heap_end
brk = libc.sbrk(0)
del x
kept = libc.sbrk(0) == brk
print(json.dumps([enabled, in_heap, kept]))
"""


def _probe(tuning: str) -> tuple[bool, bool, bool]:
    env = {**os.environ, "POSTTRAIN_MALLOC_TUNING": tuning, "LD_PRELOAD": ""}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout
    enabled, in_heap, kept = json.loads(out)
    return enabled, in_heap, kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_large_blocks_come_from_the_heap_and_stay_after_free():
    enabled, in_heap, kept = _probe("1")
    assert enabled
    assert in_heap  # served from the heap, not a fresh mmap
    assert kept  # the heap is not trimmed when the block is freed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_glibc_defaults_when_disabled():
    enabled, in_heap, _ = _probe("0")
    assert not enabled
    assert not in_heap  # glibc's default: a separate mmap, outside the heap


# ---- a preloaded size-class allocator (tcmalloc / jemalloc) --------------------------------


def _libdir(tmp_path: Path, *libs: str) -> list[Path]:
    for lib in libs:
        (tmp_path / lib).write_bytes(b"")
    return [tmp_path]


def test_auto_prefers_tcmalloc_then_jemalloc_then_glibc(tmp_path):
    both = _libdir(tmp_path, "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    tcmalloc = both[0] / "libtcmalloc_minimal.so.4"
    assert allocator.find_allocator("auto", both) == ("tcmalloc", tcmalloc)
    (tmp_path / "b").mkdir()
    only_je = _libdir(tmp_path / "b", "libjemalloc.so.2")
    assert allocator.find_allocator("auto", only_je)[0] == "jemalloc"
    (tmp_path / "c").mkdir()
    assert allocator.find_allocator("auto", [tmp_path / "c"]) is None
    assert allocator.find_allocator("glibc", both) is None
    assert allocator.find_allocator(" TCMalloc ", both)[0] == "tcmalloc"


def test_explicit_missing_or_unknown_allocator_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="none of .*libjemalloc.so.2.* is installed"):
        allocator.find_allocator("jemalloc", [tmp_path])
    with pytest.raises(ValueError, match="expected auto, tcmalloc, jemalloc or glibc"):
        allocator.find_allocator("mimalloc", [tmp_path])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_allocator_env_prepends_preload_and_keeps_user_settings(tmp_path, monkeypatch):
    dirs = _libdir(tmp_path, "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "_lib_dirs", lambda: dirs)
    lib = str(dirs[0] / "libtcmalloc_minimal.so.4")
    env = allocator.allocator_env({"LD_PRELOAD": "/x/libfoo.so", "TCMALLOC_RELEASE_RATE": "5"})
    assert env["LD_PRELOAD"] == f"{lib} /x/libfoo.so"
    assert "TCMALLOC_RELEASE_RATE" not in env  # the user's own value wins
    assert allocator.allocator_env({})["TCMALLOC_RELEASE_RATE"] == "0"
    assert allocator.allocator_env({"LD_PRELOAD": lib}) == {}  # already preloaded
    assert allocator.allocator_env({allocator.CHOICE_VAR: "glibc"}) == {}


INSTALLED = allocator.find_allocator("auto") if sys.platform.startswith("linux") else None
needs_allocator = pytest.mark.skipif(INSTALLED is None, reason="no tcmalloc/jemalloc installed")

REEXEC_PROBE = """
import json, os, torch
from posttrain.train.allocator import (keep_freed_memory, preloaded_allocator,
                                       reexec_with_allocator, use_warm_host_memory)
reexec_with_allocator()
x = torch.randn(256, 256, requires_grad=True)
(x @ x).sum().backward()  # torch runs under the preloaded allocator
print(json.dumps([preloaded_allocator(), keep_freed_memory(), use_warm_host_memory(),
                  os.environ.get("LD_PRELOAD", "")]))
"""


def _reexec_probe(**env: str) -> list:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.CHOICE_VAR)}
    out = subprocess.run([sys.executable, "-c", REEXEC_PROBE], env={**base, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@needs_allocator
def test_reexec_starts_the_process_again_under_the_installed_allocator():
    name, lib = INSTALLED
    preloaded, glibc_tuned, in_use, preload = _reexec_probe()
    assert preloaded == in_use == name
    assert not glibc_tuned  # mallopt is left alone: glibc's heap is not the one in use
    assert preload.split()[0] == str(lib)


@needs_allocator
def test_reexec_can_be_turned_off():
    preloaded, glibc_tuned, in_use, _ = _reexec_probe(**{allocator.CHOICE_VAR: "glibc"})
    assert preloaded is None and in_use == "glibc" and glibc_tuned


@needs_allocator
def test_posttrain_command_trains_under_the_allocator(tmp_path, chat_jsonl):
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.CHOICE_VAR)}
    proc = subprocess.run([sys.executable, "-m", "posttrain", "sft", "model=tiny:nano",
                           f"data={chat_jsonl}", f"output_dir={tmp_path}", "max_steps=2"],
                          env=base, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"host allocator: {INSTALLED[0]}" in proc.stderr
    assert (tmp_path / "final" / "config.json").is_file()
