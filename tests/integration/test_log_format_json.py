"""``recstack serve --log-format json`` as a log shipper reads it: every stderr line is one JSON object."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from serving import free_port, wait_until_serving

from recstack.v1 import ranking_pb2, ranking_pb2_grpc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _json_lines(stderr: str) -> list[dict]:
    records = []
    for number, line in enumerate(stderr.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"stderr line {number} is not JSON: {line!r}\n--- stderr ---\n{stderr}")
        assert isinstance(records[-1], dict), line
    return records


def test_serve_logs_one_json_object_per_line(redis_url, tmp_path) -> None:
    from test_ranking_server import ITEMS, V1, publish_model

    models = tmp_path / "models"
    publish_model(models, V1, seed=1)
    port = free_port()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "recstack.cli", "serve", "--log-format", "json",
             "--host", "127.0.0.1", "--port", str(port), "--models", str(models), "--redis", redis_url],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        try:
            wait_until_serving(port, process, stderr_path.read_text)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = ranking_pb2_grpc.RankingServiceStub(channel)
                assert stub.Rank(ranking_pb2.RankRequest(user_id="u1", item_ids=ITEMS[:20]), timeout=30).items
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    records = _json_lines(stderr_path.read_text())
    messages = [r["message"] for r in records]
    assert any(m.startswith("ranking server on 127.0.0.1") for m in messages), messages
    assert "ranking server stopped" in messages, messages
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    started = next(r for r in records if r["message"].startswith("ranking server on"))
    assert started["level"] == "INFO" and started["logger"] == "services.ranking.server"


def test_a_refused_command_line_is_a_json_record_too(redis_url) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "recstack.cli", "serve", "--log-format", "json",
         "--workers", "2", "--port", "0", "--redis", redis_url],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (record,) = [r for r in _json_lines(done.stderr) if r["level"] == "ERROR"]
    assert "--workers needs a fixed --port" in record["message"]
