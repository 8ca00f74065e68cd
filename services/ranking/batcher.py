"""MicroBatcher: many concurrent calls become one feature read and one forward pass.

A call enters a bounded queue with a future and awaits it. One dispatcher task on the event
loop forms batches:

* it takes everything waiting, up to ``max_batch_cost`` candidates (a single larger request
  still goes alone), so a batch grows with the load and no fixed batch size is ever awaited;
* it never waits when the server is idle: with no batch in flight a lone request is dispatched
  at once. Only while another batch is being computed anyway (the CPU is busy) does it hold a
  small batch back, at most ``max_queue_delay`` after its oldest request arrived, to let it fill;
* requests whose deadline has passed, or whose caller has gone, are dropped before any work;
* overload is shed with RESOURCE_EXHAUSTED (:class:`Overloaded`) rather than letting every
  request miss its deadline: at once when ``max_queue`` requests already wait, and at batch
  time for a request that has waited longer than ``max_queue_wait`` (it would miss the latency
  target anyway, and computing it would make the requests behind it miss theirs too).

A request that finds the server idle (nothing computing, nobody queued, and the last answer
more than ``idle_gap_s`` ago) is computed at once on the event loop itself when
``inline_when_idle`` is set: a lone call then makes no hop at all. A call that follows an answer
closely was probably waiting in gRPC meanwhile: it takes the batcher path, and the burst batches.

Any other batch runs in a worker thread (``compute(items, load)``), up to
``max_concurrent_batches`` at a time, so the event loop keeps accepting calls meanwhile; torch
and hiredis release the GIL for most of their work.

A batch's results may carry a ``followup(spare)`` (the shadow arm's scoring): it runs after the
batch's answers are delivered, with ``spare=True``, only when nothing is queued and no other
follow-up is running; otherwise it is called at once with ``spare=False`` (drop the optional
work, count it). It runs in ``followup_executor`` (one thread of its own), never in a batch
worker and never holding a batch slot: a call that arrives meanwhile is computed at once beside
it instead of waiting behind it.

``load`` (0-1) is how close the batch came to being shed: the largest of its oldest request's
wait over ``max_queue_wait``, the queue's depth over ``max_queue`` and ``extra_load()`` (the
server passes the event loop's lag over its limit). The model routes more
requests to its light path as it grows, so quality gives way before anything is shed.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from services.ranking.errors import DeadlineExpired, Overloaded, ShuttingDown
from services.ranking.metrics import RankingMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# compute(items, load) -> one result per item, in order; a result may be an Exception instance,
# which fails that item's caller alone. Raising fails the whole batch.
ComputeFn = Callable[[Sequence[Any], float], Sequence[Any]]


@dataclass(slots=True)
class _Job(Generic[T]):
    item: T
    cost: int
    enqueued: float  # loop.time()
    deadline: float | None  # loop.time() after which the caller no longer waits
    future: asyncio.Future
    span: Any = None  # the call's span, with tracing on


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        compute: ComputeFn,
        executor: Executor,
        *,
        max_batch_cost: int = 4_096,
        max_queue_delay_s: float = 0.001,
        max_queue: int = 64,
        max_queue_wait_s: float = 0.0,
        shed_min_queue: int = 1,
        max_concurrent_batches: int = 1,
        metrics: RankingMetrics | None = None,
        extra_load: Callable[[], float] | None = None,
        inline_when_idle: bool = False,
        idle_gap_s: float = 0.001,
        tracing: Any = None,
        followup_executor: Executor | None = None,
    ) -> None:
        self._compute = compute
        # A RankTracing, or None: off, and then the only trace of tracing is that None test.
        self._tracing = tracing
        self._executor = executor
        self._followup_executor = followup_executor or executor
        self._following = False  # a follow-up is running (at most one at a time)
        self._max_cost = max_batch_cost
        self._max_delay = max_queue_delay_s
        self._max_queue = max_queue
        self._max_wait = max_queue_wait_s  # 0: no time limit in the queue
        self._shed_min_queue = shed_min_queue  # wait-based shedding needs at least this backlog
        self._max_concurrent = max_concurrent_batches
        self._extra_load = extra_load  # another 0-1 load signal (the event loop's lag), or None
        self._inline = inline_when_idle
        # A call that comes this soon after the last answer was probably waiting in gRPC while
        # that one was computed: a burst, which the batcher path gathers into batches.
        self._idle_gap = idle_gap_s
        self._last_done = float("-inf")
        self._metrics = metrics or RankingMetrics()
        self._queue: collections.deque[_Job[T]] = collections.deque()
        self._queued_cost = 0
        self._in_flight = 0
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._dispatcher: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self._max_concurrent)
        self._dispatcher = self._loop.create_task(self._dispatch_forever(), name="micro-batcher")

    async def stop(self) -> None:
        """Refuse new work, finish what is queued and in flight, then end the dispatcher."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._dispatcher is not None:
            await self._dispatcher
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    # --- state ---------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._queue)

    def load(self, oldest_wait_s: float, depth: int) -> float:
        """0 (idle) to 1 (about to shed): see the module docstring."""
        by_depth = depth / self._max_queue
        by_wait = oldest_wait_s / self._max_wait if self._max_wait > 0 else 0.0
        extra = self._extra_load() if self._extra_load is not None else 0.0
        return min(1.0, max(by_depth, by_wait, extra))

    # --- request side --------------------------------------------------------------------------
    async def submit(self, item: T, cost: int, timeout_s: float | None = None) -> R:
        """Queue ``item`` (``cost`` = its candidates) and wait for its result.

        ``timeout_s`` is the caller's remaining deadline; past it the item is dropped unworked.
        Raises :class:`Overloaded` at once when the queue is full.
        """
        if self._closing or self._loop is None:
            self._metrics.shed.labels("shutdown").inc()
            raise ShuttingDown("the server is shutting down")
        if len(self._queue) >= self._max_queue:
            self._metrics.shed.labels("queue_full").inc()
            raise Overloaded(f"ranking queue is full ({self._max_queue} requests waiting); retry later")
        loop = self._loop
        now = loop.time()
        if (
            self._inline
            and not self._in_flight
            and not self._queue
            and now - self._last_done > self._idle_gap
        ):
            return self._run_inline(item, cost, timeout_s)
        future = loop.create_future()
        deadline = None if timeout_s is None else now + timeout_s
        span = None if self._tracing is None else self._tracing.current_span()
        self._queue.append(_Job(item, cost, now, deadline, future, span))
        self._queued_cost += cost
        self._metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()  # type: ignore[union-attr]
        return await future

    def _run_inline(self, item: T, cost: int, timeout_s: float | None) -> R:
        """Compute a request that found the server idle right here, on the event loop.

        Nothing else is computing and nobody waits, so the loop has nothing better to do; calls
        arriving meanwhile wait in gRPC and form the next batch. It saves the hand-off to a worker
        thread and back (a queue, two thread wake-ups and loop iterations), which on an idle
        machine, with every cache cold, costs more than the forward pass itself."""
        if timeout_s is not None and timeout_s <= 0:
            self._metrics.shed.labels("deadline").inc()
            raise DeadlineExpired("deadline passed before the call was computed")
        metrics = self._metrics
        metrics.batch_requests.observe(1)
        metrics.batch_candidates.observe(cost)
        metrics.queue_delay.observe(0.0)
        self._in_flight += 1
        try:
            if self._tracing is None:
                results = self._compute((item,), self.load(0.0, 1))
            else:
                results = self._compute_traced_inline(item, cost)
            (result,) = results
        except Exception:
            log.exception("a request computed inline failed")
            raise
        finally:
            self._in_flight -= 1
            self._last_done = self._loop.time()  # type: ignore[union-attr]
            if self._queue:
                self._wakeup.set()  # type: ignore[union-attr]
        followup = getattr(results, "followup", None)
        if followup is not None:
            self._schedule_followup(followup)
        if isinstance(result, BaseException):
            raise result
        return result

    def _compute_traced_inline(self, item: T, cost: int) -> Sequence[Any]:
        """A batch of one inside its span (current on this thread while it computes)."""
        tracing, now, load = self._tracing, self._loop.time(), self.load(0.0, 1)  # type: ignore[union-attr]
        with tracing.batch([tracing.current_span()], [now], now, candidates=cost, load=load, inline=True):
            return self._compute((item,), load)

    async def _compute_traced(self, batch: list[_Job[T]], items: list[T], load: float) -> Sequence[Any]:
        """The batch in a worker thread inside its span. ``run_in_executor`` does not carry
        context variables over by itself: the thread runs in a copy of this task's context,
        taken while the batch's span is current there."""
        loop, tracing = self._loop, self._tracing
        assert loop is not None and tracing is not None
        spans = [job.span for job in batch]
        enqueued = [job.enqueued for job in batch]
        cost = sum(job.cost for job in batch)
        with tracing.batch(spans, enqueued, loop.time(), candidates=cost, load=load, inline=False):
            run = contextvars.copy_context().run
            return await loop.run_in_executor(self._executor, run, self._compute, items, load)

    def _schedule_followup(self, followup: Callable[[bool], None]) -> None:
        """A batch's optional follow-up work, only with spare capacity: nothing queued and no
        follow-up running. Otherwise it is told so at once (on the loop: it only counts and
        hands over what it must)."""
        if self._queue or self._closing or self._following:
            try:
                followup(False)
            except Exception:
                log.exception("a batch's follow-up work failed")
            return
        self._following = True
        task = self._loop.create_task(self._follow(followup))  # type: ignore[union-attr]
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _follow(self, followup: Callable[[bool], None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._followup_executor, followup, True)
        except Exception:
            log.exception("a batch's follow-up work failed")
        finally:
            self._following = False

    # --- dispatcher ----------------------------------------------------------------------------
    async def _dispatch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup, slots = self._wakeup, self._slots
        assert wakeup is not None and slots is not None
        while True:
            while not self._queue:
                if self._closing:
                    return
                wakeup.clear()
                await wakeup.wait()
            await slots.acquire()
            if self._in_flight and self._max_delay > 0:
                await self._gather_company(loop, wakeup)
            now = loop.time()
            batch = self._take(now)
            if not batch:
                slots.release()
                continue
            self._in_flight += 1
            self._metrics.in_flight_batches.set(self._in_flight)
            # The load the batch saw: how long its oldest waited, and itself plus what it left waiting.
            load = self.load(now - batch[0].enqueued, len(batch) + len(self._queue))
            task = loop.create_task(self._run_batch(batch, load))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _gather_company(self, loop: asyncio.AbstractEventLoop, wakeup: asyncio.Event) -> None:
        """While another batch runs, let a small batch fill for up to max_queue_delay."""
        until = self._queue[0].enqueued + self._max_delay
        while self._in_flight and self._queued_cost < self._max_cost and not self._closing:
            remaining = until - loop.time()
            if remaining <= 0:
                return
            wakeup.clear()
            timer = loop.call_later(remaining, wakeup.set)
            try:
                await wakeup.wait()
            finally:
                timer.cancel()

    def _take(self, now: float) -> list[_Job[T]]:
        """Pop the next batch: live jobs in arrival order, up to the cost cap (at least one job)."""
        batch: list[_Job[T]] = []
        cost = 0
        queue = self._queue
        queue_delay = self._metrics.queue_delay
        shed_on_wait = self._max_wait > 0 and len(queue) >= self._shed_min_queue
        while queue:
            job = queue[0]
            if batch and cost + job.cost > self._max_cost:
                break
            queue.popleft()
            self._queued_cost -= job.cost
            if job.future.done():  # the caller went away (cancelled, or its deadline ended the call)
                self._metrics.shed.labels("cancelled").inc()
                continue
            if job.deadline is not None and now >= job.deadline:
                self._metrics.shed.labels("deadline").inc()
                job.future.set_exception(DeadlineExpired("deadline passed while queued; not computed"))
                continue
            if shed_on_wait and now - job.enqueued > self._max_wait:
                self._metrics.shed.labels("queue_wait").inc()
                job.future.set_exception(
                    Overloaded(
                        f"waited over {self._max_wait * 1000:.0f} ms for the ranking queue; retry later"
                    )
                )
                continue
            queue_delay.observe(now - job.enqueued)
            batch.append(job)
            cost += job.cost
        self._metrics.queue_depth.set(len(queue))
        return batch

    async def _run_batch(self, batch: list[_Job[T]], load: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            items = [job.item for job in batch]
            self._metrics.batch_requests.observe(len(batch))
            self._metrics.batch_candidates.observe(sum(job.cost for job in batch))
            try:
                if self._tracing is None:
                    results = await loop.run_in_executor(self._executor, self._compute, items, load)
                else:
                    results = await self._compute_traced(batch, items, load)
            except Exception as exc:  # the whole batch failed: every caller gets the error
                log.exception("micro-batch of %d requests failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                return
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            followup = getattr(results, "followup", None)
            if followup is not None:
                self._schedule_followup(followup)  # runs beside the next batches, not before them
        finally:
            self._in_flight -= 1
            self._last_done = loop.time()
            self._metrics.in_flight_batches.set(self._in_flight)
            assert self._slots is not None and self._wakeup is not None
            self._slots.release()
            self._wakeup.set()  # a waiting small batch need not wait for company any more
