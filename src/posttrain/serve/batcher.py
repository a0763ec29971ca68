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

With an engine that reports each decode step (``generate(..., on_step=...)``, as the built-in
``KVCacheGenerator`` does), every request follows its own completions step by step: a
streaming request (``Batcher.stream``) receives its new token ids after every step, and any
request is answered as soon as all of its completions have ended (stop token, stop string or
its own budget), not when the call's longest one ends. Tokens cross from the worker thread to
the event loop by ``loop.call_soon_threadsafe``. An engine without ``on_step`` still works:
its tokens then arrive all at once, when its call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from posttrain.rollout.engine import DecodeStep
from posttrain.rollout.protocol import FinishReason, Generator, Rollouts, SamplingParams

log = logging.getLogger("posttrain")

# How long the worker waits for more requests after the first one of a batch.
DEFAULT_WAIT_S = 0.005

_STOP = object()  # queue sentinel: the worker exits
_unique = itertools.count()  # group keys of requests that must run alone


# What a streaming request receives: {completion index k: token ids new since the last item}
# after a decode step, then its Rollouts (the last item).
TokenUpdate = dict[int, list[int]]


@dataclass
class _Job:
    prompts: list[list[int]]
    n: int
    sampling: SamplingParams
    deliver: Callable[[Rollouts | BaseException], None]
    on_tokens: Callable[[TokenUpdate], None] | None = None  # streaming requests only
    delivered: bool = False
    cancelled: bool = False  # the client went away: nothing more is sent to it

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def finish(self, result: Rollouts | BaseException) -> None:
        if not self.delivered:
            self.delivered = True
            self.deliver(result)

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


@dataclass
class _Progress:
    """One request's completions as the engine samples them, cut to its own budget."""

    job: _Job
    toks: list[list[int]] = field(init=False)
    lps: list[list[float]] = field(init=False)
    reasons: list[FinishReason] = field(init=False)
    running: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        k = self.job.rows
        self.toks, self.lps = [[] for _ in range(k)], [[] for _ in range(k)]
        self.reasons, self.running = ["length"] * k, [True] * k

    def add(self, k: int, token: int, logprob: float, stopped: bool) -> bool:
        """Record completion ``k``'s next token; False once ``k`` has ended for this request
        (the token is then not its own: it lies past the request's budget)."""
        if not self.running[k]:
            return False
        self.toks[k].append(token)
        self.lps[k].append(logprob)
        if stopped:
            self.reasons[k], self.running[k] = "stop", False
        elif len(self.toks[k]) >= self.job.sampling.max_new_tokens:
            self.running[k] = False
        return True

    def done(self) -> bool:
        return not any(self.running)

    def rollouts(self) -> Rollouts:
        return Rollouts([list(p) for p in self.job.prompts], self.toks, self.lps, self.reasons,
                        self.job.n)


class _GroupTracker:
    """The ``on_step`` callback of one engine call: sends each streaming request its new
    tokens and answers each request whose completions have all ended."""

    def __init__(self, jobs: list[_Job]):
        self.progress = [_Progress(j) for j in jobs]
        # engine row -> (its request's progress, the row's index within that request)
        self.owner = [(p, k) for p in self.progress for k in range(p.job.rows)]

    def __call__(self, step: DecodeStep) -> None:
        stopped = set(step.stopped)
        new: dict[int, TokenUpdate] = {}
        for r, t, lp in zip(step.rows, step.tokens, step.logprobs, strict=True):
            p, k = self.owner[r]
            if p.add(k, t, lp, r in stopped):
                new.setdefault(id(p), {}).setdefault(k, []).append(t)
        for p in self.progress:
            job = p.job
            if job.delivered:
                continue
            if job.on_tokens is not None and not job.cancelled and id(p) in new:
                job.on_tokens(new[id(p)])
            if p.done():
                job.finish(p.rollouts())


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
        self.steps = _reports_steps(generator)
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
            _call_in(loop, _settle, fut, result)

        self._queue.put(_Job([list(p) for p in prompts], n, sampling, deliver))
        return await fut

    async def stream(self, prompts: Sequence[Sequence[int]], n: int,
                     sampling: SamplingParams) -> AsyncIterator[TokenUpdate | Rollouts]:
        """This request's new token ids after every decode step (``{k: ids}``, completion
        ``k = prompt * n + sample``), then its ``Rollouts`` as the last item (whose
        completions are exactly the tokens sent before). An engine error is raised. Closing
        the iterator early (the client went away) stops the sending; the engine call runs on
        for its other requests."""
        if self._thread is None:
            raise RuntimeError("Batcher.start() was not called")
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[TokenUpdate | Rollouts | BaseException] = asyncio.Queue()

        def push(item: TokenUpdate | Rollouts | BaseException) -> None:
            _call_in(loop, items.put_nowait, item)

        job = _Job([list(p) for p in prompts], n, sampling, push, on_tokens=push)
        self._queue.put(job)
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Rollouts):
                    return
        finally:
            job.cancelled = True

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
                    job.finish(e)  # (requests already answered keep their answer)

    def _run_group(self, jobs: list[_Job]) -> None:
        budget = max(j.sampling.max_new_tokens for j in jobs)
        sampling = replace(jobs[0].sampling, max_new_tokens=budget)
        prompts = [p for j in jobs for p in j.prompts]
        n = jobs[0].n
        self.stats.engine_calls += 1
        self.stats.max_requests_per_call = max(self.stats.max_requests_per_call, len(jobs))
        tracker = _GroupTracker(jobs)
        extra: dict[str, Any] = {"on_step": tracker} if self.steps else {}
        ro = self.generator.generate(prompts, n, sampling, **extra)
        start = 0
        # Requests the steps have not answered: all of them for an engine without on_step.
        for p in tracker.progress:
            j, stop = p.job, start + p.job.rows
            if not j.delivered:
                result = _cut(ro, start, stop, j.sampling.max_new_tokens, j.prompts)
                if j.on_tokens is not None and not j.cancelled:
                    j.on_tokens({k: ids[len(p.toks[k]):]
                                 for k, ids in enumerate(result.completion_ids)})
                j.finish(result)
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
                job.finish(err)


def _settle(fut: asyncio.Future, result: Rollouts | BaseException) -> None:
    if fut.done():  # the client went away and its handler was cancelled
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _call_in(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in ``loop``'s thread; a closed loop (RuntimeError) means nobody is
    listening any more."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _reports_steps(generator: Generator) -> bool:
    """Whether ``generator.generate`` takes ``on_step`` (see ``rollout.engine.DecodeStep``)."""
    try:
        return "on_step" in inspect.signature(generator.generate).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
