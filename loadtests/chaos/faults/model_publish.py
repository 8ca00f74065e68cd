"""A corrupted model published where the ranking servers poll for new versions."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from loadtests.chaos.faults import register
from loadtests.chaos.faults.base import Fault, FaultSpec, retry
from loadtests.chaos.stack import served_version


@register
class ModelCorrupt(Fault):
    spec = FaultSpec(
        "model-corrupt",
        "corrupted model versions published (bad checksum; good checksum, broken weights)",
        "both refused, the old version keeps serving; ranking errors only as allowed",
        hold_s=5.0,
    )
    order = 90

    def inject(self) -> None:
        from models.artifacts import (
            WEIGHTS_FP32,
            WEIGHTS_INT8,
            list_versions,
            new_version_name,
            write_manifest,
        )

        run = self.run
        assert run.traffic is not None
        current = list_versions(run.models)[-1]
        bad: list[Path] = []
        for k, rewrite_manifest in enumerate((False, True), 1):
            name = new_version_name(time.time() + 60 * k)
            staging = run.models / f".tmp-{name}"
            shutil.copytree(current, staging)
            for weights in (WEIGHTS_INT8, WEIGHTS_FP32):
                data = bytearray((staging / weights).read_bytes())
                data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # flipped bytes mid-file
                if rewrite_manifest:
                    data = data[: len(data) // 3]  # and cut short: the checksum matches, the load fails
                (staging / weights).write_bytes(bytes(data))
            if rewrite_manifest:
                write_manifest(staging)
            staging.rename(run.models / name)  # published atomically, as training does
            bad.append(run.models / name)
        time.sleep(self.spec.hold_s)
        user, items = run.traffic.users[0], run.vocab[:20]
        for service, port in zip(run.servers, run.server_ports, strict=True):
            version = retry(lambda port=port: served_version(port, user, items))
            refused = [b.name for b in bad if f"model version {b.name} refused" in service.log_text()]
            self.result.check(
                f"{service.name} refused both and still serves {current.name}",
                # With the run's A/B experiment, arm B's users are served its (older) version.
                version in {current.name, *run.exp.arms.values()} and len(refused) == len(bad),
                f"serves {version}; refused {refused or 'none'}",
            )
        for folder in bad:
            shutil.rmtree(folder, ignore_errors=True)
