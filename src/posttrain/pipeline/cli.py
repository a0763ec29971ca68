"""``posttrain pipeline run|check|kinds``: the command line of the pipeline runner."""

from __future__ import annotations

import argparse
import sys

from posttrain.pipeline.source import PipelineError

USAGE = "posttrain pipeline {run,check} FILE.yaml [options] [key=value ...] | pipeline kinds"
OVERRIDES_HELP = ("key=value overrides of the file: seed=1, output_dir=runs/b, "
                  "defaults.precision=fp32, stages.sft.max_steps=10, repeat.rounds=2")


def _parser(action: str) -> argparse.ArgumentParser:
    doc = {"run": "run the stages that are not done yet",
           "check": "validate the file and show what run would do; runs nothing"}[action]
    p = argparse.ArgumentParser(prog=f"posttrain pipeline {action}", description=doc)
    p.add_argument("file", help="the pipeline YAML file (docs/pipelines.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--output-dir", default=None, help="instead of the file's output_dir")
    p.add_argument("--workers", type=int, default=None,
                   help="stages run side by side (default: the file's workers, else 1)")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--only", metavar="STAGE", help="run just this stage (its inputs done)")
    p.add_argument("--force", metavar="STAGE", action="append", default=[],
                   help="rerun this stage and everything downstream from scratch (repeatable)")
    return p


def _check(a: argparse.Namespace) -> int:
    from posttrain.pipeline.runner import check_pipeline, plan_steps

    plan = check_pipeline(a.file, a.overrides, a.output_dir, a.workers)
    steps = plan_steps(plan, a.until, a.only, a.force)
    print(f"ok: {plan.file}: {len(plan.stages)} stages -> {plan.output_dir}")
    for s in steps:
        inputs = ", ".join(s.stage.inputs) or "-"
        print(f"  {s.stage.name:<14} {s.stage.kind:<10} from {inputs:<20} {s.action}: {s.why}")
    return 0


def _run(a: argparse.Namespace) -> int:
    from posttrain.pipeline.runner import run_pipeline

    outputs = run_pipeline(a.file, until=a.until, only=a.only, force=a.force,
                           output_dir=a.output_dir, workers=a.workers, overrides=a.overrides)
    for name, path in outputs.items():
        print(f"{name}: {path}")
    return 0


def _kinds() -> int:
    from posttrain.pipeline.kinds import stage_kinds

    for name, kind in stage_kinds().items():
        print(f"{name:<10} {kind.doc}")
    return 0


def main(argv: list[str]) -> int:
    action = argv[0] if argv else ""
    if action == "kinds":
        return _kinds()
    if action not in ("run", "check"):
        print(f"usage: {USAGE}", file=sys.stderr if action not in ("-h", "--help") else None)
        return 0 if action in ("-h", "--help") else 2
    # intermixed: key=value overrides may come before or after the options
    a = _parser(action).parse_intermixed_args(argv[1:])
    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        print(f"error: unexpected argument {bad[0]!r}; overrides are key=value", file=sys.stderr)
        return 2
    try:
        return (_run if action == "run" else _check)(a)
    except PipelineError as err:  # one line per problem, each one an error
        for line in err.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
