"""Concurrent requests in, batched engine calls out.

    request handlers (event loop) --submit--> queue --worker thread--> generator.generate
            ^                                                               |
            +------------------ each request's slice of the Rollouts -------+

The worker takes the first waiting request, then collects whatever else arrives within
``wait_s`` (or is already queued) until ``max_batch`` sequences (prompts x n) are in hand, and
runs one ``generate`` per *sampling group*: requests whose outputs cannot depend on sharing a
call. A group shares ``n``, temperature, top-p/top-k, stop tokens and stop strings; its
``max_new_tokens`` is the largest asked for, and each completion is then cut to its own
request's budget (the tokens a smaller budget would have produced: sampling does not look
ahead). Greedy requests group regardless of seed; a seeded sampled request runs alone, since
its random draws would otherwise depend on its batchmates (the engine draws one number per
live row per step), and ``seed`` promises the same output for the same request.

This is static batching: a call runs until its longest completion ends, and requests that
arrive meanwhile wait for the next call. The engine runs in one thread of its own, so the
event loop keeps accepting requests (and answering errors) while it computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace

from posttrain.rollout.protocol import Generator, Rollouts, SamplingParams

log = logging.getLogger("posttrain")

# How long the worker waits for more requests after the first one of a batch.
DEFAULT_WAIT_S = 0.005

_STOP = object()  # queue sentinel: the worker exits
_unique = itertools.count()  # group keys of requests that must run alone


@dataclass
class _Job:
    prompts: list[list[int]]
    n: int
    sampling: SamplingParams
    deliver: Callable[[Rollouts | BaseException], None]

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def key(self) -> Hashable:
        """Requests with equal keys can share one engine call without changing each other's
        output (or its distribution)."""
        sp = self.sampling
        stops = (sp.stop_token_ids, sp.stop_strings)
        if sp.temperature == 0:  # greedy ignores top-p, top-k and the seed
            return (self.n, 0.0, stops)
        alone = next(_unique) if sp.seed is not None else None
        return (self.n, sp.temperature, sp.top_p, sp.top_k, stops, alone)


@dataclass
class BatcherStats:
    """Counters for monitoring and tests (how much batching actually happened)."""

    requests: int = 0
    engine_calls: int = 0
    max_requests_per_call: int = 0  # the most requests one generate call served
    failed_calls: int = 0


def _cut(ro: Rollouts, start: int, stop: int, budget: int, prompts: Sequence) -> Rollouts:
    """Completions ``start:stop`` of ``ro``, each cut to ``budget`` tokens (then ``length``)."""
    ids, lps, reasons = [], [], []
    for k in range(start, stop):
        toks = ro.completion_ids[k]
        cut = len(toks) > budget
        ids.append(toks[:budget])
        lps.append(ro.logprobs[k][:budget])
        reasons.append("length" if cut else ro.finish_reasons[k])
    return Rollouts([list(p) for p in prompts], ids, lps, reasons, ro.n, dict(ro.stats))


class Batcher:
    """Batches ``generate`` requests from many coroutines into few calls of ``generator``.

    ``max_batch`` bounds the sequences (prompts x n) of one batch; a single request larger
    than that still runs, alone. Call ``start()`` before submitting and ``close()`` at the end.
    """

    def __init__(self, generator: Generator, *, max_batch: int = 32,
                 wait_s: float = DEFAULT_WAIT_S):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.generator, self.max_batch, self.wait_s = generator, max_batch, wait_s
        self.stats = BatcherStats()
        self._queue: queue.Queue = queue.Queue()
        self._carry: _Job | None = None  # taken from the queue but over the batch's budget
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="posttrain-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the call in progress; requests still queued fail."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None
        self._fail_queued(RuntimeError("the server is shutting down"))

    def pending(self) -> int:
        """Requests submitted and not yet taken into a batch."""
        return self._queue.qsize() + (self._carry is not None)

    async def generate(self, prompts: Sequence[Sequence[int]], n: int,
                       sampling: SamplingParams) -> Rollouts:
        """This request's rollouts, from a batched call shared with concurrent requests."""
        if self._thread is None:
            raise RuntimeError("Batcher.start() was not called")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Rollouts] = loop.create_future()

        def deliver(result: Rollouts | BaseException) -> None:
            # A closed loop (RuntimeError) means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, fut, result)

        self._queue.put(_Job([list(p) for p in prompts], n, sampling, deliver))
        return await fut

    # --- worker thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._run(batch)

    def _collect(self) -> list[_Job] | None:
        """The next batch: the first waiting job, plus what arrives within ``wait_s``."""
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is _STOP:
            return None
        batch, rows = [first], first.rows
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_batch:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if job is _STOP or rows + job.rows > self.max_batch:
                self._carry = job  # runs (or stops the worker) after this batch
                break
            batch.append(job)
            rows += job.rows
        return batch

    def _run(self, batch: list[_Job]) -> None:
        self.stats.requests += len(batch)
        groups: dict[Hashable, list[_Job]] = {}
        for job in batch:
            groups.setdefault(job.key(), []).append(job)
        for jobs in groups.values():
            try:
                self._run_group(jobs)
            except Exception as e:  # the engine failed: these requests fail, the server lives
                log.exception("generation failed for %d request(s)", len(jobs))
                self.stats.failed_calls += 1
                for job in jobs:
                    job.deliver(e)

    def _run_group(self, jobs: list[_Job]) -> None:
        budget = max(j.sampling.max_new_tokens for j in jobs)
        sampling = replace(jobs[0].sampling, max_new_tokens=budget)
        prompts = [p for j in jobs for p in j.prompts]
        n = jobs[0].n
        self.stats.engine_calls += 1
        self.stats.max_requests_per_call = max(self.stats.max_requests_per_call, len(jobs))
        ro = self.generator.generate(prompts, n, sampling)
        start = 0
        for j in jobs:
            stop = start + len(j.prompts) * n
            j.deliver(_cut(ro, start, stop, j.sampling.max_new_tokens, j.prompts))
            start = stop

    def _fail_queued(self, err: BaseException) -> None:
        jobs = [self._carry] if self._carry is not None else []
        self._carry = None
        while True:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in jobs:
            if job is not _STOP:
                job.deliver(err)


def _settle(fut: asyncio.Future, result: Rollouts | BaseException) -> None:
    if fut.done():  # the client went away and its handler was cancelled
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
