"""MicroBatcher: batching, cost cap, shedding, deadlines, per-item errors, draining on stop.

The compute function here is a plain Python callable run in a real worker thread; threading
events (not sleeps or timings) decide when a batch may finish, so the tests are deterministic.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.ranking.batcher import MicroBatcher
from services.ranking.errors import DeadlineExpired, Overloaded, ShuttingDown
from services.ranking.metrics import RankingMetrics


class Recorder:
    """A compute function that records its batches and can be held until released."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list] = []
        self.loads: list[float] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, items, load):
        self.batches.append(list(items))
        self.loads.append(load)
        self.started.set()
        assert self.release.wait(30)
        return [ValueError(f"bad {x}") if x == "fail" else f"r-{x}" for x in items]


def _batcher(compute, **kw) -> tuple[MicroBatcher, RankingMetrics, ThreadPoolExecutor]:
    metrics = RankingMetrics()
    pool = ThreadPoolExecutor(max_workers=2)
    kw.setdefault("max_queue_delay_s", 0.0)
    return MicroBatcher(compute, pool, metrics=metrics, **kw), metrics, pool


async def _wait_until(predicate, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


def test_idle_request_is_dispatched_alone_and_answered():
    async def main():
        rec = Recorder()
        batcher, _, pool = _batcher(rec, max_queue_delay_s=10.0)  # a huge delay must not apply when idle
        await batcher.start()
        assert await batcher.submit("a", cost=1) == "r-a"
        await batcher.stop()
        pool.shutdown()
        assert rec.batches == [["a"]]

    asyncio.run(main())


def test_requests_waiting_during_a_batch_form_the_next_batch():
    async def main():
        rec = Recorder(hold=True)
        batcher, metrics, pool = _batcher(rec, max_concurrent_batches=1)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit("a", cost=1))
        await _wait_until(rec.started.is_set)
        rest = [asyncio.ensure_future(batcher.submit(x, cost=1)) for x in "bcde"]
        await _wait_until(lambda: batcher.depth == 4)
        rec.release.set()
        assert await first == "r-a"
        assert await asyncio.gather(*rest) == ["r-b", "r-c", "r-d", "r-e"]
        await batcher.stop()
        pool.shutdown()
        assert rec.batches == [["a"], ["b", "c", "d", "e"]]
        assert metrics.value("recstack_ranking_batch_requests_count") == 2

    asyncio.run(main())


def test_batches_are_capped_by_total_cost_but_a_large_request_still_runs():
    async def main():
        rec = Recorder(hold=True)
        batcher, _, pool = _batcher(rec, max_batch_cost=250, max_concurrent_batches=1)
        await batcher.start()
        blocker = asyncio.ensure_future(batcher.submit("x", cost=1))
        await _wait_until(rec.started.is_set)
        costs = {"a": 100, "b": 100, "c": 100, "d": 400, "e": 10}
        futs = [asyncio.ensure_future(batcher.submit(k, cost=v)) for k, v in costs.items()]
        await _wait_until(lambda: batcher.depth == 5)
        rec.release.set()
        await blocker
        await asyncio.gather(*futs)
        await batcher.stop()
        pool.shutdown()
        assert rec.batches == [["x"], ["a", "b"], ["c"], ["d"], ["e"]]

    asyncio.run(main())


def test_full_queue_sheds_with_resource_exhausted():
    async def main():
        rec = Recorder(hold=True)
        batcher, metrics, pool = _batcher(rec, max_queue=2, max_concurrent_batches=1)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", cost=1))
        await _wait_until(rec.started.is_set)
        queued = [asyncio.ensure_future(batcher.submit(x, cost=1)) for x in "bc"]
        await _wait_until(lambda: batcher.depth == 2)
        assert batcher.load(0.0, batcher.depth) == 1.0
        with pytest.raises(Overloaded):
            await batcher.submit("d", cost=1)
        rec.release.set()
        await asyncio.gather(running, *queued)
        await batcher.stop()
        pool.shutdown()
        assert metrics.value("recstack_ranking_shed_total", {"reason": "queue_full"}) == 1
        assert ["d"] not in rec.batches
        assert rec.loads[1] == 1.0  # the second batch saw a full queue

    asyncio.run(main())


def test_expired_request_is_dropped_before_any_work():
    async def main():
        rec = Recorder(hold=True)
        batcher, metrics, pool = _batcher(rec, max_concurrent_batches=1)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", cost=1))
        await _wait_until(rec.started.is_set)
        late = asyncio.ensure_future(batcher.submit("late", cost=1, timeout_s=0.0))
        on_time = asyncio.ensure_future(batcher.submit("ok", cost=1, timeout_s=60.0))
        await _wait_until(lambda: batcher.depth == 2)
        rec.release.set()
        assert await running == "r-a"
        with pytest.raises(DeadlineExpired):
            await late
        assert await on_time == "r-ok"
        await batcher.stop()
        pool.shutdown()
        assert all("late" not in b for b in rec.batches)
        assert metrics.value("recstack_ranking_shed_total", {"reason": "deadline"}) == 1

    asyncio.run(main())


def test_cancelled_caller_is_not_computed():
    async def main():
        rec = Recorder(hold=True)
        batcher, _, pool = _batcher(rec, max_concurrent_batches=1)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", cost=1))
        await _wait_until(rec.started.is_set)
        gone = asyncio.ensure_future(batcher.submit("gone", cost=1))
        await _wait_until(lambda: batcher.depth == 1)
        gone.cancel()
        stays = asyncio.ensure_future(batcher.submit("b", cost=1))
        rec.release.set()
        await asyncio.gather(running, stays)
        await batcher.stop()
        pool.shutdown()
        assert all("gone" not in b for b in rec.batches)

    asyncio.run(main())


def test_item_error_fails_only_that_caller_and_batch_error_fails_all():
    async def main():
        rec = Recorder(hold=True)
        batcher, _, pool = _batcher(rec, max_concurrent_batches=1)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit("a", cost=1))
        await _wait_until(rec.started.is_set)
        bad = asyncio.ensure_future(batcher.submit("fail", cost=1))
        good = asyncio.ensure_future(batcher.submit("b", cost=1))
        await _wait_until(lambda: batcher.depth == 2)
        rec.release.set()
        await first
        with pytest.raises(ValueError, match="bad fail"):
            await bad
        assert await good == "r-b"
        await batcher.stop()

        def broken(items, load):
            raise RuntimeError("boom")

        b2 = MicroBatcher(broken, pool, metrics=RankingMetrics(), max_queue_delay_s=0.0)
        await b2.start()
        with pytest.raises(RuntimeError, match="boom"):
            await b2.submit("x", cost=1)
        await b2.stop()
        pool.shutdown()

    asyncio.run(main())


def test_delay_holds_a_small_batch_only_while_another_runs():
    async def main():
        rec = Recorder(hold=True)
        # A delay far longer than the test: the small batch may only go when the running
        # batch ends (then the CPU is free and waiting has no point).
        batcher, _, pool = _batcher(rec, max_concurrent_batches=2, max_queue_delay_s=3600.0)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit("a", cost=1))
        await _wait_until(rec.started.is_set)
        second = asyncio.ensure_future(batcher.submit("b", cost=1))
        third = asyncio.ensure_future(batcher.submit("c", cost=1))
        await asyncio.sleep(0.05)
        assert len(rec.batches) == 1, "a free slot must not dispatch while a batch runs and the delay lasts"
        rec.release.set()
        assert await asyncio.gather(first, second, third) == ["r-a", "r-b", "r-c"]
        await batcher.stop()
        pool.shutdown()
        assert rec.batches == [["a"], ["b", "c"]]

    asyncio.run(main())


def test_stop_drains_queued_work_then_refuses_new():
    async def main():
        rec = Recorder(hold=True)
        batcher, _, pool = _batcher(rec, max_concurrent_batches=1)
        await batcher.start()
        futs = [asyncio.ensure_future(batcher.submit(x, cost=1)) for x in "abc"]
        await _wait_until(rec.started.is_set)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDown):
            await batcher.submit("late", cost=1)
        rec.release.set()
        await stopping
        assert await asyncio.gather(*futs) == ["r-a", "r-b", "r-c"]
        pool.shutdown()

    asyncio.run(main())


def test_requests_that_waited_too_long_are_shed_and_load_rises_with_the_wait():
    async def main():
        rec = Recorder(hold=True)
        batcher, metrics, pool = _batcher(rec, max_concurrent_batches=1, max_queue=100, max_queue_wait_s=0.02)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", cost=1))
        await _wait_until(rec.started.is_set)
        stale = asyncio.ensure_future(batcher.submit("stale", cost=1))
        await asyncio.sleep(0.05)  # "stale" has now waited longer than max_queue_wait
        fresh = asyncio.ensure_future(batcher.submit("fresh", cost=1))
        await _wait_until(lambda: batcher.depth == 2)
        rec.release.set()
        assert await running == "r-a"
        with pytest.raises(Overloaded, match="waited over 20 ms"):
            await stale
        assert await fresh == "r-fresh"
        await batcher.stop()
        pool.shutdown()
        assert all("stale" not in b for b in rec.batches)
        assert metrics.value("recstack_ranking_shed_total", {"reason": "queue_wait"}) == 1

    asyncio.run(main())
    batcher = MicroBatcher(Recorder(), None, max_queue=100, max_queue_wait_s=0.010)  # type: ignore[arg-type]
    assert batcher.load(0.0, 0) == 0.0
    assert batcher.load(0.005, 1) == pytest.approx(0.5)  # half the allowed wait
    assert batcher.load(0.001, 80) == pytest.approx(0.8)  # or the queue's depth, whichever is larger
    assert batcher.load(0.050, 1) == 1.0
    assert MicroBatcher(Recorder(), None, max_queue=10).load(5.0, 5) == 0.5  # type: ignore[arg-type]


def test_a_short_backlog_is_computed_late_rather_than_shed():
    """A stall on a lightly loaded server (queue shorter than shed_min_queue) sheds nothing."""

    async def main():
        rec = Recorder(hold=True)
        batcher, metrics, pool = _batcher(
            rec, max_concurrent_batches=1, max_queue=100, max_queue_wait_s=0.02, shed_min_queue=3
        )
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", cost=1))
        await _wait_until(rec.started.is_set)
        stale = asyncio.ensure_future(batcher.submit("stale", cost=1))
        await asyncio.sleep(0.05)  # waited longer than max_queue_wait, but it is alone in the queue
        rec.release.set()
        assert await running == "r-a"
        assert await stale == "r-stale"
        await batcher.stop()
        pool.shutdown()
        assert metrics.value("recstack_ranking_shed_total", {"reason": "queue_wait"}) == 0

    asyncio.run(main())


def test_extra_load_signal_counts_toward_the_load_the_model_routes_by():
    lag = {"load": 0.0}
    batcher = MicroBatcher(Recorder(), None, max_queue=100, extra_load=lambda: lag["load"])  # type: ignore[arg-type]
    assert batcher.load(0.0, 10) == pytest.approx(0.1)
    lag["load"] = 0.7
    assert batcher.load(0.0, 10) == pytest.approx(0.7)
    lag["load"] = 3.0
    assert batcher.load(0.0, 10) == 1.0


def test_loop_lag_measures_how_late_the_event_loop_runs():
    import time

    from services.ranking.looplag import LoopLag

    async def main():
        metrics = RankingMetrics()
        lag = LoopLag(interval_s=0.002, gauge=metrics.loop_lag)
        lag.start()
        await asyncio.sleep(0.02)
        idle = lag.lag_s
        time.sleep(0.05)  # the loop is blocked: the next tick fires ~50 ms late
        await asyncio.sleep(0.003)
        blocked = lag.lag_s
        await asyncio.sleep(0.03)  # a few ticks later the window holds on-time ticks only
        recovered = lag.lag_s
        await lag.stop()
        return idle, blocked, recovered, metrics.value("recstack_ranking_loop_lag_seconds")

    idle, blocked, recovered, exported = asyncio.run(main())
    assert blocked >= 0.04 > idle
    assert recovered < 0.04
    assert exported == recovered
