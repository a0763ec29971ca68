"""The offline training loop (SFT, reward models, DPO): a deterministic, resumable batch
stream and ``fit``, which drives the engine, evaluation and checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from posttrain.train.engine import Batch, CountFn, Engine, LossFn


class BatchStream:
    """Endless, deterministic stream of collated micro-batches over ``examples``.

    The order of epoch ``e`` is a permutation drawn from ``seed + e``, so the stream's whole
    state is ``(epoch, pos)``: restoring it resumes exactly where an interrupted run stood.

    Under data parallelism every rank draws the same order and each step consumes
    ``world_size * batch_size`` examples, rank ``r`` taking the r-th slice; a tail too short
    to give every rank a full slice is dropped, so N ranks see exactly what one process with
    an N-times larger batch would.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        collate: Callable[[list[Any]], Batch],
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(examples) < world_size * batch_size and world_size > 1:
            raise ValueError(f"{len(examples)} examples cannot fill one global batch of "
                             f"{world_size} x {batch_size}")
        if not examples:
            raise ValueError("BatchStream needs at least one example")
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._plan(0)

    def __len__(self) -> int:
        """Micro-batches per epoch (per rank)."""
        if self.world_size > 1:
            return len(self.examples) // (self.batch_size * self.world_size)
        return math.ceil(len(self.examples) / self.batch_size)

    def _plan(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next(self) -> Batch:
        span = self.batch_size * self.world_size
        left = len(self._order) - self.pos
        if left <= 0 or (self.world_size > 1 and left < span):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._plan(self.epoch)
        chunk = self._order[self.pos : self.pos + span]
        self.pos += len(chunk)
        idx = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.collate([self.examples[i] for i in idx])

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._plan(self.epoch)


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
    while engine.step < engine.total_steps:
        micro = [stream.next() for _ in range(cfg.grad_accum)]
        metrics = engine.update(micro, loss_fn, count_fn)
        metrics["train/epoch"] = stream.epoch + stream.pos / len(stream.examples)
        done = engine.step == engine.total_steps
        if eval_fn is not None and (done or (cfg.eval_steps and engine.step % cfg.eval_steps == 0)):
            last_eval = eval_fn()
            metrics.update(last_eval)
        if done or engine.step % max(cfg.logging_steps, 1) == 0 or "train/nonfinite" in metrics:
            engine.log(metrics)
        if cfg.save_steps and engine.step % cfg.save_steps == 0 and not done:
            engine.save(stream.state())
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
    engine.log(first_metrics or {})
    try:
        fit(engine, stream, loss_fn, count_fn, eval_fn)
        return engine.save_final()
    finally:
        engine.close()
