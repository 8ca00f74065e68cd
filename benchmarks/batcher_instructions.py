"""Fixed work for counting instructions: ``N`` calls through the micro-batcher of one source tree.

The batcher's own cost per call, free of a shared machine's noise: count the instructions of a
run with valgrind, for two call counts, and divide the difference by the difference in calls
(start-up cancels out). Compares a tree with a change against one without it, e.g. the tracing
code with tracing off (docs/OPERATIONS.md, "Tracing"):

    for tree in /tmp/notrace .; do for n in 1000 11000; do
      valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python benchmarks/batcher_instructions.py $tree inline $n 2>&1 | grep Collected
    done; done

``inline``: each call computed on the event loop (an idle server); ``queued``: calls in groups
of 100 through the queue and a worker thread. The compute function does nothing.
"""

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, sys.argv[1])  # the source tree to measure, ahead of the installed one

from services.ranking.batcher import MicroBatcher  # noqa: E402
from services.ranking.metrics import RankingMetrics  # noqa: E402


def compute(items, load):
    return [0] * len(items)


async def main(mode, n):
    m = RankingMetrics()
    ex = ThreadPoolExecutor(1)
    if mode == "inline":
        b = MicroBatcher(compute, ex, metrics=m, inline_when_idle=True, idle_gap_s=0.0)
        await b.start()
        for _ in range(n):
            await b.submit("x", 1, None)
    else:
        b = MicroBatcher(compute, ex, metrics=m, inline_when_idle=False, max_queue=100_000)
        await b.start()
        for _ in range(n // 100):
            await asyncio.gather(*(b.submit("x", 1, None) for _ in range(100)))
    await b.stop()
    ex.shutdown()


asyncio.run(main(sys.argv[2], int(sys.argv[3])))
