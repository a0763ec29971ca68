"""``posttrain sandbox run FILE.py`` and ``posttrain sandbox check``.

``run`` prints the result as JSON and exits 0 only when the program passed, so users can try
the isolation on their own machine (docs/sandbox.md has attack programs to try).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tokenize
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.sandbox.check import check_isolation
from posttrain.sandbox.config import ISOLATIONS, SandboxConfig
from posttrain.sandbox.runner import run_program


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain sandbox",
                                description="isolated execution of untrusted Python code")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = SandboxConfig()
    run = sub.add_parser("run", help="run FILE.py in the sandbox; print the result as JSON")
    run.add_argument("file", help="Python file to run ('-' reads the program from stdin)")
    run.add_argument("--timeout", type=float, default=d.timeout_s, help="wall-clock seconds")
    run.add_argument("--memory", type=int, default=d.memory_mb, help="address space, MB")
    run.add_argument("--max-procs", type=int, default=d.max_procs)
    run.add_argument("--max-output", type=int, default=d.max_output_bytes,
                     help="bytes of stdout and of stderr")
    run.add_argument("--isolation", choices=ISOLATIONS, default=d.isolation)
    run.add_argument("--site-packages", action="store_true",
                     help="let the program import the interpreter's installed packages")
    run.add_argument("--stdin", default=None, help="file whose content is the program's stdin")
    run.add_argument("--python", default=None,
                     help="interpreter for the program (default: the one running posttrain)")
    sub.add_parser("check", help="report which isolation is available")
    return p


def _read(path: str) -> str:
    """The program's text, decoded as Python decodes source: UTF-8 unless a coding cookie
    (``# -*- coding: latin-1 -*-``) names another encoding."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise PosttrainError(f"cannot read {path}: {e.strerror}") from None
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError) as e:
        where = "stdin" if path == "-" else path
        raise PosttrainError(f"{where}: not valid Python source text ({e}); save it as UTF-8 "
                             "or declare its encoding in a coding comment") from None


def _cmd_run(a: argparse.Namespace) -> int:
    cfg = SandboxConfig(timeout_s=a.timeout, memory_mb=a.memory, max_procs=a.max_procs,
                        max_output_bytes=a.max_output, isolation=a.isolation,
                        site_packages=a.site_packages, python=a.python)
    stdin = _read(a.stdin) if a.stdin is not None else None
    res = run_program(_read(a.file), stdin=stdin, config=cfg)
    print(json.dumps(res.to_dict(), indent=2))
    return 0 if res.passed else 1


def _cmd_check() -> int:
    report = check_isolation()
    print(json.dumps(report, indent=2))
    if not report["bwrap_works"]:
        print(f"bubblewrap unavailable: {report['bwrap_error']}. Runs will be refused unless "
              "--isolation limits-only is chosen (resource limits only).", file=sys.stderr)
    return 0 if report["bwrap_works"] else 1


def main(argv: list[str]) -> int:
    """Entry point for ``posttrain sandbox ...``; PosttrainError propagates to the caller."""
    a = _parser().parse_args(argv)
    return _cmd_check() if a.cmd == "check" else _cmd_run(a)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except PosttrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
