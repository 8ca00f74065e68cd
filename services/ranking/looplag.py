"""How far behind the event loop runs, as a load signal and an admission check.

The micro-batcher bounds the time a request spends in *its* queue, but under overload the backlog
forms before that: calls wait in gRPC and in the event loop's own ready queue for their handler
to run, which no queue of ours sees. A timer that should fire every ``interval`` shows that wait
directly: it fires late by about as long as a call arriving now waits for the loop.

:class:`LoopLag` keeps the largest lateness of the last ``window`` ticks (a few milliseconds).
With a backlog of calls in flight, the backend refuses a call with RESOURCE_EXHAUSTED when the lag
is past ``max_loop_lag_ms`` (a refusal costs the loop a fraction of a served call, so it catches
up), and counts ``lag / max`` in the load the model routes by, so the light path takes over
before anything is refused.

The timer runs only while calls are in flight (``busy()``; :meth:`wake` restarts it): lag matters
only with a backlog, and an idle server that woke every 2 ms would spend ~30 ms of CPU a second
on it and pay that in every lone call's cold caches.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from services.ranking.tasks import cancel_and_wait


class LoopLag:
    def __init__(
        self,
        interval_s: float = 0.002,
        window: int = 4,
        gauge: Any = None,
        busy: Callable[[], bool] = lambda: True,
    ) -> None:
        self._interval = interval_s
        self._gauge = gauge
        self._busy = busy
        self._woken: asyncio.Event | None = None
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self.lag_s = 0.0
        self._task: asyncio.Task | None = None

    def wake(self) -> None:
        """A call arrived: measure again if the timer was resting."""
        woken = self._woken
        if woken is not None and not woken.is_set():
            woken.set()

    def start(self) -> None:
        self._woken = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._measure_forever(), name="loop-lag")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _measure_forever(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._interval
        woken = self._woken
        assert woken is not None
        while True:
            if not self._busy():  # rest until a call arrives; no backlog means no lag
                self._recent.clear()
                self.lag_s = 0.0
                if self._gauge is not None:
                    self._gauge.set(0.0)
                woken.clear()
                await woken.wait()
            start = loop.time()
            await asyncio.sleep(interval)
            # Timers fire on the selector's millisecond grid: up to ~1 ms late on an idle loop.
            self._recent.append(max(0.0, loop.time() - start - interval))
            self.lag_s = max(self._recent)
            if self._gauge is not None:
                self._gauge.set(self.lag_s)
