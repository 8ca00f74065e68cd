"""Redis faults: restarted, losing acknowledged writes, stalling."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loadtests.chaos.faults import register
from loadtests.chaos.faults.base import STREAM_CHECKS, Fault, FaultSpec, event_log_census, records_covered

if TYPE_CHECKING:
    from loadtests.stats import StepRecord

REWINDS = "recstack_stream_fence_rewinds_total"
REWOUND = "recstack_stream_fence_rewound_records_total"


@register
class RedisRestart(Fault):
    spec = FaultSpec(
        "redis-restart",
        "Redis restarted (infra/redis.sh restart)",
        f"{STREAM_CHECKS}; ranking errors only as the contract allows",
        hold_s=2.0,
    )
    order = 40
    needs = ("redis",)

    def inject(self) -> None:
        started = time.monotonic()
        self.run.infra.restart("redis")
        self.result.figures["restart_s"] = round(time.monotonic() - started, 1)


@register
class RedisLoseWrites(Fault):
    """Make Redis lose acknowledged writes for certain: the append-only file switched off (as an
    operator running without it would), a few seconds of writes, then SIGKILL and a restart that
    loads the AOF as it stood when it was switched off (``infra/redis.sh`` turns it on again). The
    loss is counted from the applied offsets just before the kill (writes paused, so none is
    acknowledged in between) and just after the restart."""

    spec = FaultSpec(
        "redis-lose-writes",
        "Redis loses acknowledged writes: AOF switched off, SIGKILL, restart from the stale AOF",
        f"writes lost counted; the consumers apply them again; {STREAM_CHECKS}; event log exactly once",
        hold_s=5.0,
    )
    order = 50
    needs = ("redis",)

    def inject(self) -> None:
        import redis

        run, result = self.run, self.result
        assert run.state is not None and run.traffic is not None
        pid = run.infra.pid("redis")
        if pid is None:
            raise RuntimeError("Redis has no live pid file: it was not started by infra/")
        self.rewinds0, self.rewound0 = run.scrape_sum(REWINDS), run.scrape_sum(REWOUND)
        self.twice0 = event_log_census(run, wait=False).twice
        client = redis.Redis.from_url(run.cfg.redis_url, socket_timeout=5)
        try:
            client.config_set("appendonly", "no")
            time.sleep(max(0.5, self.spec.hold_s - 1.5))
            client.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # reads still answer
            before = records_covered(run.state.applied())
        finally:
            client.close()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while Path(f"/proc/{pid}").exists() and time.monotonic() - killed < 10:
            time.sleep(0.05)
        run.infra.start("redis")
        result.figures["restart_s"] = round(time.monotonic() - killed, 1)
        applied = None
        while applied is None and time.monotonic() - killed < 60:
            applied = run.state.applied()  # None until the restarted Redis answers
            if applied is None:
                time.sleep(0.2)
        after = records_covered(applied)
        self.lost = lost = before - after
        result.figures["writes_lost_records"] = lost
        result.check(
            "Redis lost acknowledged writes",
            lost > 0,
            f"applied offsets covered {before:,} records before the kill and {after:,} after the "
            f"restart: the writes of {lost:,} records were lost",
        )

    def check(self, record: StepRecord) -> None:
        run, result = self.run, self.result
        rewinds = run.scrape_sum(REWINDS) - self.rewinds0
        rewound = run.scrape_sum(REWOUND) - self.rewound0
        result.figures["rewound_records"] = int(rewound)
        result.check(
            "the consumers noticed the loss and read exactly the lost records again",
            rewinds > 0 and int(rewound) == self.lost,
            f"{rewinds:.0f} partitions rewound, {rewound:.0f} records read again ({self.lost} lost)",
        )
        census = event_log_census(run)
        twice = census.twice - self.twice0
        result.figures["logged_twice"] = twice
        result.check(
            "the event log holds every event, none logged twice by the rewind",
            census.caught_up and census.missing == 0 and twice == 0,
            census.detail("more logged twice", twice_before=self.twice0),
        )


@register
class RedisSlow(Fault):
    spec = FaultSpec(
        "redis-slow",
        "Redis stalls 50 ms of every 100 ms (CLIENT PAUSE)",
        f"ranking answers (degraded allowed), errors only as allowed; {STREAM_CHECKS}",
        hold_s=8.0,
    )
    order = 60

    def inject(self) -> None:
        import redis

        client = redis.Redis.from_url(self.run.cfg.redis_url, socket_timeout=5)
        pauses = 0
        end = time.monotonic() + self.spec.hold_s
        try:
            while time.monotonic() < end:
                client.execute_command("CLIENT", "PAUSE", 50, "ALL")
                pauses += 1
                time.sleep(0.1)
        finally:
            client.close()
        self.result.figures["pauses"] = pauses
