"""The offline training loop (SFT, reward models, DPO): ``fit`` drives the engine over a
deterministic, resumable batch stream (``data.batching.BatchStream``), with evaluation and
checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.data.batching import BatchStream
from posttrain.train.engine import CountFn, Engine, LossFn
from posttrain.train.run import StopOnSignal


def total_steps(max_steps: int, epochs: float, batches_per_epoch: int, grad_accum: int) -> int:
    """``max_steps`` when set (> 0), else enough optimizer steps to cover ``epochs``."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * batches_per_epoch / grad_accum))


def fit(
    engine: Engine,
    stream: BatchStream,
    loss_fn: LossFn,
    count_fn: CountFn,
    eval_fn: Callable[[], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Run optimizer steps from ``engine.step`` to ``engine.total_steps``.

    Logs every ``logging_steps``, evaluates every ``eval_steps`` and at the end, checkpoints
    every ``save_steps``. Returns the last evaluation's metrics (empty without ``eval_fn``).
    """
    cfg = engine.cfg
    last_eval: dict[str, float] = {}
    with StopOnSignal() as stop:  # SIGINT/SIGTERM: checkpoint at the step's end, then stop
        while engine.step < engine.total_steps:
            micro = [stream.next() for _ in range(cfg.grad_accum)]
            metrics = engine.update(micro, loss_fn, count_fn)
            metrics["train/epoch"] = stream.epoch + stream.pos / len(stream.examples)
            done = engine.step == engine.total_steps
            if eval_fn is not None and (done or (cfg.eval_steps and
                                                 engine.step % cfg.eval_steps == 0)):
                last_eval = eval_fn()
                metrics.update(last_eval)
            if done or engine.step % max(cfg.logging_steps, 1) == 0 or \
                    "train/nonfinite" in metrics:
                engine.log(metrics)
            if cfg.save_steps and engine.step % cfg.save_steps == 0 and not done:
                engine.save(stream.state())
            if not done:
                stop.after_step(engine, lambda: engine.save(stream.state()))
    return last_eval


def train_offline(
    cfg: Any,
    model: Any,
    tokenizer: Any,
    run_dir: Path,
    resume_from: Path | None,
    stream: BatchStream,
    loss_fn: LossFn,
    count_fn: CountFn,
    eval_fn: Callable[[], dict[str, float]] | None = None,
    first_metrics: dict[str, Any] | None = None,
) -> Path:
    """The whole offline run after data prep: engine, resume, ``fit``, final save.

    Shared by SFT, reward models and preference optimisation; returns ``run_dir/final``.
    """
    steps = total_steps(cfg.max_steps, cfg.epochs, len(stream), cfg.grad_accum)
    engine = Engine(cfg, model, tokenizer, run_dir, steps)
    if resume_from is not None:
        stream.load_state(engine.restore(resume_from)["cursor"])
    engine.check_free_space()
    engine.log(first_metrics or {})
    try:
        fit(engine, stream, loss_fn, count_fn, eval_fn)
        return engine.save_final()
    finally:
        engine.close()
