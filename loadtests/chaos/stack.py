"""The local stack as ``recstack chaos`` runs it: the broker and Redis of ``infra/``, two stream
consumers, two ranking servers, an event-log disk it can fill or make read-only, and the readers
the checks need (applied/logged offsets, committed offsets, dead letters, metrics, logs).

Every service is its own process started through the ``recstack`` command, and every fault is
what an operator or the kernel would do to it: a signal, an ``infra/*.sh restart``, a full disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RECSTACK = [sys.executable, "-m", "recstack.cli"]


def free_port() -> int:
    """A TCP port the kernel just handed out for 127.0.0.1 (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Infra:
    """The broker and Redis of ``make up``, controlled through ``infra/*.sh`` on the given ports."""

    def __init__(self, kafka_port: int, redis_port: int) -> None:
        self.env = {
            **os.environ,
            "RECSTACK_KAFKA_PORT": str(kafka_port),
            "RECSTACK_REDIS_PORT": str(redis_port),
        }
        self.started: list[str] = []

    def _script(self, name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO / "infra" / name), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def running(self, service: str) -> bool:
        return self._script(f"{service}.sh", "status").returncode == 0

    def pid(self, service: str) -> int | None:
        """The pid ``infra/<service>.sh`` recorded for a running ``service``, or None."""
        run_dir = Path(self.env.get("RECSTACK_RUN_DIR") or REPO / ".run")
        try:
            pid = int((run_dir / f"{service}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def up(self) -> None:
        self.started = [s for s in ("kafka", "redis") if not self.running(s)]
        result = self._script("up.sh")
        if result.returncode != 0:
            raise RuntimeError(f"infra/up.sh failed:\n{result.stdout}{result.stderr}")

    def start(self, service: str) -> None:
        result = self._script(f"{service}.sh", "start")
        if result.returncode != 0:
            raise RuntimeError(f"infra/{service}.sh start failed:\n{result.stdout}{result.stderr}")

    def restart(self, service: str) -> None:
        result = self._script(f"{service}.sh", "restart")
        if result.returncode != 0:
            raise RuntimeError(f"infra/{service}.sh restart failed:\n{result.stdout}{result.stderr}")

    def down(self) -> None:
        """Stop only what :meth:`up` started."""
        for service in reversed(self.started):
            self._script(f"{service}.sh", "stop")

    def create_topics(self, bootstrap: str, topics: dict[str, int]) -> None:
        args = [a for name, n in topics.items() for a in ("--topic", f"{name}:{n}")]
        result = subprocess.run(
            [sys.executable, str(REPO / "infra" / "kafka" / "admin.py"), "--bootstrap", bootstrap,
             "--timeout", "60", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"creating topics {list(topics)} failed:\n{result.stdout}{result.stderr}")


# How the stack's background work (stream consumers, broker, event traffic) yields the CPU to the
# ranking servers: "idle" (SCHED_IDLE: it runs only on cores nothing else wants), "low"
# (niceness 10) or "normal" (no difference). Both need no privileges.
BACKGROUND_PRIORITIES = ("idle", "low", "normal")
LOW_NICENESS = 10


def command_prefix(priority: str) -> list[str]:
    """What to run a command through for ``priority``; both exec it (same pid)."""
    if priority == "idle":
        return ["chrt", "--idle", "0"]
    if priority == "low":
        return ["nice", "-n", str(LOW_NICENESS)]
    return []


def set_thread_priority(tid: int, priority: str) -> None:
    """Give one thread (0: the calling one) ``priority``; threads it starts later inherit it.
    Scheduling policy and niceness are per thread on Linux."""
    if priority == "idle":
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    elif priority == "low":
        os.setpriority(os.PRIO_PROCESS, tid, LOW_NICENESS)
    else:  # back to the default (raising priority again may need privileges: callers tolerate OSError)
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, tid, 0)


def set_priority(pid: int, priority: str) -> int:
    """Give every thread of running process ``pid`` ``priority`` (the process's own entry alone
    would leave a running JVM's threads as they were); returns how many threads were changed."""
    changed = 0
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return 0
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that has just ended
            set_thread_priority(tid, priority)
            changed += 1
    return changed


class Service:
    """One ``recstack`` process (a stream consumer or a ranking server): signalled, restarted.

    ``priority`` (see :data:`BACKGROUND_PRIORITIES`) other than "normal" starts it so that on a
    shared machine it yields the cores to the latency-bound processes."""

    def __init__(self, name: str, args: list[str], log_path: Path, priority: str = "normal") -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.priority = priority
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("a") as log:
            log.write(f"\n===== {time.strftime('%H:%M:%S')} starting {self.name} =====\n")
            log.flush()
            prefix = command_prefix(self.priority)
            self.proc = subprocess.Popen(
                [*prefix, *RECSTACK, *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        if self.wait(timeout) is None:
            self.signal(signal.SIGKILL)
            self.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def wait_serving(port: int, timeout_s: float) -> bool:
    """True once the ranking server on ``port`` reports SERVING (a model is loaded)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from recstack.client import make_channel, settings_from_env

    deadline = time.monotonic() + timeout_s
    with make_channel(f"127.0.0.1:{port}", retries=None, **settings_from_env()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="recstack.v1.RankingService"), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    return False


def served_version(port: int, user_id: str, items: list[str]) -> str:
    """The model version a direct ``Rank`` call to the server on ``port`` is answered with."""
    from recstack.client import RankingClient, settings_from_env

    # Strict: the chaos run counts every failed call; its caller retries on its own terms.
    with RankingClient(f"127.0.0.1:{port}", strict=True, deadline_s=5, **settings_from_env()) as client:
        return client.rank(user_id, items, top_k=5).model_version


def scrape(port: int, metric: str) -> float | None:
    """The value of one unlabelled metric on a ``/metrics`` endpoint (None when unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    match = re.search(rf"^{re.escape(metric)} ([0-9.eE+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class EventLogDisk:
    """The consumers' event-log folder on a small tmpfs of its own, so it can be filled or made
    read-only without touching any other file system. Mounting needs root; without it the disk
    faults are skipped and the folder is an ordinary one."""

    FILLER = ".chaos-filler"

    def __init__(self, path: Path, size_mb: int = 64) -> None:
        self.path = path
        self.size_mb = size_mb
        self.mounted = False
        self.why_not = ""

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.why_not = "needs root to mount a tmpfs for the event log"
            return
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "recstack-chaos", str(self.path)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            self.why_not = f"cannot mount a tmpfs for the event log: {result.stderr.strip()}"
            return
        self.mounted = True

    def fill(self) -> int:
        """Write zeros until the disk is full; returns the bytes written."""
        written = 0
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError), (self.path / self.FILLER).open("wb") as fh:
            while True:
                fh.write(chunk)
                fh.flush()
                written += len(chunk)
        with contextlib.suppress(OSError), (self.path / self.FILLER).open("ab") as fh:
            while True:  # the last, partial megabyte
                fh.write(b"\0" * 4096)
                fh.flush()
        return written

    def free(self) -> None:
        (self.path / self.FILLER).unlink(missing_ok=True)

    def _remount(self, mode: str) -> None:
        for _ in range(50):  # busy while a consumer has a part file open: retry shortly
            result = subprocess.run(
                ["mount", "-o", f"remount,{mode}", str(self.path)], capture_output=True, text=True
            )
            if result.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"remount {mode} of {self.path} failed: {result.stderr.strip()}")

    def read_only(self) -> None:
        self._remount("ro")

    def read_write(self) -> None:
        self._remount("rw")

    def event_ids(self) -> Counter:
        """How often each event id is in the event log's part files."""
        import pyarrow.parquet as pq

        ids: Counter = Counter()
        for path in self.path.rglob("part-*.parquet"):
            ids.update(pq.read_table(path, columns=["event_id"]).column("event_id").to_pylist())
        return ids

    def unmount(self) -> None:
        if not self.mounted:
            return
        with contextlib.suppress(RuntimeError):
            self.read_write()
        result = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, text=True)
        self.mounted = False


class StreamState:
    """What Redis and Kafka say about the stream: applied and logged offsets, committed offsets."""

    def __init__(self, redis_url: str, bootstrap: str, topic: str, group: str) -> None:
        import redis

        from services.stream.keys import applied_key, logged_key

        self.redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self._applied_key = applied_key(topic)
        self._logged_key = logged_key(topic)
        self._admin: Any = None

    def _offsets(self, key: str) -> dict[int, int] | None:
        import redis

        try:
            return {int(p): int(o) for p, o in self.redis.hgetall(key).items()}
        except redis.RedisError:
            return None

    def applied(self) -> dict[int, int] | None:
        return self._offsets(self._applied_key)

    def logged(self) -> dict[int, int] | None:
        return self._offsets(self._logged_key)

    def committed(self) -> dict[int, int] | None:
        """Next offsets the group committed to Kafka, per partition (None when the broker is away)."""
        from kafka.admin import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            if self._admin is None:
                self._admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap, client_id="recstack-chaos", request_timeout_ms=5_000
                )
            offsets = self._admin.list_group_offsets({self.group: None}).get(self.group, {})
        except (KafkaError, OSError):
            return None
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == self.topic}

    @staticmethod
    def covers(offsets: dict[int, int] | None, target: dict[int, int]) -> bool:
        """Every partition of ``target`` is at or past its offset in ``offsets``."""
        return offsets is not None and all(offsets.get(p, -1) >= o for p, o in target.items())

    def wait_applied(self, target: dict[int, int], timeout_s: float) -> float | None:
        """Seconds until every partition's applied offset reaches ``target``; None on timeout."""
        return self._wait(self.applied, target, timeout_s)

    def wait_logged(self, target: dict[int, int], timeout_s: float) -> float | None:
        return self._wait(self.logged, target, timeout_s)

    def _wait(self, read, target: dict[int, int], timeout_s: float) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.covers(read(), target):
                return time.monotonic() - start
            time.sleep(0.2)
        return None

    def close(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
        self.redis.close()


class DeadLetters:
    """Reads the dead-letter topic from its beginning, keeping each letter's source partition and offset."""

    def __init__(self, bootstrap: str, dlq_topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = dlq_topic
        self.sources: Counter = Counter()  # (source partition, source offset) -> letters
        self._consumer: Any = None

    def collect(self, expected: set[tuple[int, int]], timeout_s: float = 30.0) -> Counter:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self._consumer is None:
                    consumer = KafkaConsumer(
                        bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False
                    )
                    parts = consumer.partitions_for_topic(self.topic) or set()
                    consumer.assign([TopicPartition(self.topic, p) for p in parts])
                    consumer.seek_to_beginning()
                    self._consumer = consumer
                for records in self._consumer.poll(timeout_ms=500).values():
                    for rec in records:
                        headers = {k: v.decode(errors="replace") for k, v in rec.headers}
                        self.sources[(int(headers["source-partition"]), int(headers["source-offset"]))] += 1
            except KafkaError:
                time.sleep(0.5)
                continue
            if expected <= set(self.sources):
                break
        return self.sources

    def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                self._consumer.close()


def copy_newest_version(source: Path, dest: Path) -> Path:
    """Copy the newest model version of ``source`` (a models folder or a version folder) into ``dest``."""
    from models.artifacts import MANIFEST, list_versions

    versions = [source] if (source / MANIFEST).is_file() else list_versions(source)
    if not versions:
        raise FileNotFoundError(f"no model version in {source}")
    target = dest / versions[-1].name
    dest.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copytree(versions[-1], target)
    return target
