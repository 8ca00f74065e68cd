"""``recstack serve --workers N``: N server processes on one port, so a box's cores are all used.

One Python process is bound by its interpreter lock to about one core; N processes that bind
the same port with SO_REUSEPORT let the kernel spread incoming connections across them. Each
worker is a full ``recstack serve`` (its own batcher, model and Redis connection) started with
this process's own command line, so flags and ``RECSTACK_*`` variables apply to all of them.
This process only supervises: it forwards SIGTERM/SIGINT, and when one worker exits on its own
it stops the others and exits with that worker's status, so the orchestrator restarts the set.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)


def _worker_argv(index: int, metrics_port: int) -> list[str]:
    # argparse keeps the last value of a repeated flag, so these override what the user gave.
    port = metrics_port + index if metrics_port else 0
    return [sys.executable, "-m", "recstack.cli", *sys.argv[1:], "--workers", "1", "--reuse-port",
            "--metrics-port", str(port)]  # fmt: skip


def run_workers(count: int, metrics_port: int) -> int:
    workers = [subprocess.Popen(_worker_argv(i, metrics_port)) for i in range(count)]
    log.info("started %d ranking workers: pids %s", count, ", ".join(str(w.pid) for w in workers))
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while any(w.poll() is None for w in workers):
        exited = [w for w in workers if w.poll() is not None]
        if exited and not stopping:
            first = exited[0]
            status = first.returncode or 1
            log.error("worker pid %d exited with %s; stopping the others", first.pid, first.returncode)
            forward(signal.SIGTERM, None)
        time.sleep(0.2)
    return status or max((w.returncode or 0) for w in workers)
