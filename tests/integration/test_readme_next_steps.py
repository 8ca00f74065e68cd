"""README "Next steps", run as written: ``recstack serve`` with its defaults finds the model in
``artifacts/models`` (where ``make demo`` leaves one), and the README's grpcurl command, with the
pinned grpcurl, gets a ranked answer. A small model stands in for the demo's; the port and the
Redis database are moved off the defaults through the environment (every flag reads
``RECSTACK_<FLAG>``) so that the test shares the machine safely.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TARGET = "127.0.0.1:50051"


def _next_steps_commands() -> tuple[list[str], str]:
    """The ``recstack serve`` arguments and the grpcurl lines of the README's "Next steps"."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Next steps\n", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in section.splitlines()]
    serve = next(line for line in lines if line.startswith(".venv/bin/recstack serve"))
    grpcurl = [line for line in lines if "GRPCURL" in line and not line.startswith("`")]
    assert len(grpcurl) == 2, grpcurl  # GRPCURL=$(infra/tools.sh --grpcurl), then the call
    return serve.split()[1:], "\n".join(grpcurl)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(process: subprocess.Popen, target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                request = health_pb2.HealthCheckRequest(service="recstack.v1.RankingService")
                if health.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "server never became SERVING"
            time.sleep(0.2)


def test_readme_next_steps_serve_the_default_models_folder_and_answer_grpcurl(redis_url, tmp_path):
    from test_ranking_server import ITEMS, V1, publish_model

    from recstack import demo

    serve_args, grpcurl_lines = _next_steps_commands()
    assert serve_args == ["serve"], "the README serves with the defaults"
    assert DEFAULT_TARGET in grpcurl_lines
    asked = json.loads(re.search(r"-d '([^']*)'", grpcurl_lines).group(1))
    assert json.loads(demo.GRPCURL_RANK[2]) == asked, "make demo checks the README's call"

    # The model where `make demo` leaves it: artifacts/models under the working directory.
    publish_model(tmp_path / "artifacts" / "models", V1, seed=3, items=[*asked["item_ids"], *ITEMS])
    port = _free_port()
    env = dict(os.environ, RECSTACK_PORT=str(port), RECSTACK_METRICS_PORT="0", RECSTACK_REDIS=redis_url)
    env.pop("RECSTACK_MODELS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "recstack.cli", *serve_args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_serving(process, f"127.0.0.1:{port}")
        call = grpcurl_lines.replace(DEFAULT_TARGET, f"127.0.0.1:{port}")
        result = subprocess.run(["bash", "-euc", call], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        # The demo's last step makes the same call (and raises when the answer is not a ranking).
        demo._grpcurl_check(f"127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(timeout=60)

    assert answer.get("model_version") == V1, answer
    ranked = [item["item_id"] for item in answer["items"]]
    assert sorted(ranked) == sorted(asked["item_ids"])
    scores = [item.get("score", 0.0) for item in answer["items"]]  # grpcurl omits a 0.0 score
    assert scores == sorted(scores, reverse=True)
