"""The release gate as a pipeline stage (``kind: gate``) and the ``publish`` step behind it.

A gate stage checks an eval stage's results against thresholds (``evals.gate``). When every
threshold passes and ``publish`` is set, the gated model is copied to that release location
(atomically: a temporary copy renamed into place). When one fails, the stage fails with every
failed threshold in its message, so the pipeline stops and nothing after the gate runs: a
failing model is never published. ``on_fail: record`` instead records the failed verdict and
lets the pipeline go on (nothing is published): for gating candidates side by side, as the
demo gates its base and SFT models next to its final one. The verdict is written to
``gate.json`` either way.

    gate:
      kind: gate
      results: ${dpo_eval.output}          # an eval run directory (or its eval.json)
      baseline: ${sft_eval.output}         # for limits like "accuracy >= baseline - 0.02"
      thresholds: [refusal_rate >= 0.9, over_refusal_rate <= 0.1]   # or thresholds_file
      model: ${dpo.output}
      publish: releases/assistant-v1
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from posttrain.config.checks import Needs
from posttrain.errors import ConfigError, PosttrainError

log = logging.getLogger("posttrain")

VERDICT_FILE = "gate.json"


class GateFailed(PosttrainError):
    """A threshold failed: the gated model is not released."""


@dataclass
class GateStageConfig:
    """A release gate on an eval run's results; publishes the model when every threshold
    passes."""

    ONLY_WITH: ClassVar[dict[str, Needs]] = {
        "publish": Needs("model", None, "publish copies the gated model"),
    }

    results: str | None = field(default=None, metadata={
        "help": "the eval run directory (or eval.json) the thresholds are checked on"})
    thresholds: list[str] = field(default_factory=list, metadata={
        "help": "'METRIC OP LIMIT' strings, e.g. [refusal_rate >= 0.9] (docs/gate.md)"})
    thresholds_file: str | None = field(default=None, metadata={
        "help": "a thresholds YAML file, instead of or besides thresholds"})
    baseline: str | None = field(default=None, metadata={
        "help": "another eval run, for limits relative to it ('baseline - 0.02')"})
    model: str | None = field(default=None, metadata={"help": "the model the gate releases"})
    publish: str | None = field(default=None, metadata={
        "help": "copy the model here when the gate passes (its release location)"})
    output_dir: str = field(default="runs/gate", metadata={"help": "gate.json goes here"})
    on_fail: Literal["stop", "record"] = field(default="stop", metadata={
        "help": "stop: a failed gate fails the stage (the pipeline stops); record: the "
                "verdict is recorded and the pipeline goes on (nothing is published)"})

    def validate(self) -> None:
        if not self.results:
            raise ConfigError("results: the gate needs an eval run (results=DIR)")
        if not self.thresholds and not self.thresholds_file:
            raise ConfigError("thresholds: give a list of 'METRIC OP LIMIT' strings or "
                              "thresholds_file=FILE")
        if self.thresholds:
            from posttrain.evals.gate import parse_thresholds

            try:
                parse_thresholds(self.thresholds, "thresholds")
            except PosttrainError as e:  # checked with the rest of the file, before any run
                raise ConfigError(str(e)) from None


def run_gate_stage(cfg: GateStageConfig) -> Path:
    """Check, write ``gate.json``, publish on a pass; raises ``GateFailed`` on a failure."""
    from posttrain.evals.gate import (
        check_gate,
        format_verdict,
        load_results,
        load_thresholds,
        parse_thresholds,
    )

    thresholds = parse_thresholds(cfg.thresholds, "thresholds") if cfg.thresholds else []
    if cfg.thresholds_file:
        thresholds += load_thresholds(cfg.thresholds_file)
    baseline = load_results(cfg.baseline) if cfg.baseline else None
    verdict = check_gate(load_results(str(cfg.results)), thresholds, baseline,
                         results_name=str(cfg.results), baseline_name=cfg.baseline or "baseline")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / VERDICT_FILE).write_text(json.dumps(verdict.to_dict(), indent=2) + "\n")
    lines = format_verdict(verdict)
    for line in lines:
        log.info("gate: %s", line)
    if not verdict.passed and cfg.on_fail == "record":
        log.warning("gate: %s failed; recorded (on_fail: record), not published",
                    cfg.model or cfg.results)
        return out
    if not verdict.passed:
        raise GateFailed(f"release gate failed for {cfg.model or cfg.results}: {lines[-1]}")
    if cfg.publish:
        publish(Path(str(cfg.model)), Path(cfg.publish))
    return out


def publish(model: Path, dest: Path) -> Path:
    """Copy model directory ``model`` to ``dest`` so that ``dest`` is either the old release
    or the whole new one, never a half-copied directory."""
    if not (model / "config.json").is_file():
        raise ConfigError(f"model: {model} is not a model directory (no config.json)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.publishing")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model, tmp)
    old = dest.with_name(f".{dest.name}.replaced")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    log.info("gate passed: published %s to %s", model, dest)
    return dest


def read_verdict(run_dir: Path) -> dict[str, Any]:
    """A gate stage's summary for ``stage.json``: passed (1/0) and the failed count."""
    path = Path(run_dir) / VERDICT_FILE
    if not path.exists():
        return {}
    verdict = json.loads(path.read_text())
    checks = verdict.get("checks", [])
    return {"gate/passed": float(verdict.get("passed", False)),
            "gate/failed": float(sum(not c["passed"] for c in checks))}
