"""Experiment routing on a ranking replica: which model version answers which user.

:class:`ExperimentWatcher` polls the experiment state in Redis (:mod:`recstack.experiments.state`,
one small key) every ``interval_s`` from its own thread, like the model watcher polls the models
folder. Only when the stored bytes change does it parse them, check them (the rules of
:mod:`recstack.experiments.assign`) and load every model version the experiment names through the
same loading and checks as hot reload (manifest, weights, warm-up). A version that is missing or
fails them is refused: its arm is served by the default version, which is logged and counted
(``recstack_experiment_version_refusals_total``); a refused version is not retried. The new
:class:`Routing` then replaces the old one with one reference assignment, so a batch routes
entirely by the state it started with.

Redis unreachable or a state that does not check: the routing in force stays (counted in
``recstack_experiment_state_errors_total``); a replica never stops serving over its experiment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recstack.experiments.assign import InvalidExperiment
from recstack.experiments.state import KEY, Experiment, decode
from services.ranking.lifecycle import ModelSlot
from services.ranking.metrics import RankingMetrics
from services.ranking.tasks import cancel_and_wait

log = logging.getLogger(__name__)
_UNCHANGED = object()


@dataclass(frozen=True, slots=True)
class ShadowModel:
    name: str
    version: str
    ranker: Any


class Routing:
    """One experiment's split with its loaded rankers (None: the arm's version was refused)."""

    __slots__ = ("experiment", "shadow", "_arm_for", "_by_arm")

    def __init__(self, experiment: Experiment, by_arm: dict[str, Any], shadow: ShadowModel | None) -> None:
        self.experiment = experiment
        self.shadow = shadow
        self._arm_for = experiment.assignment.arm_for
        self._by_arm = by_arm

    def route(self, queries: Sequence[Any], default: Any) -> tuple[list[str], list[Any]]:
        """Each query's arm name and ranker (``default`` where the arm's version was refused)."""
        arm_for, by_arm = self._arm_for, self._by_arm
        names: list[str] = []
        rankers: list[Any] = []
        for q in queries:
            name = arm_for(q.user_id).name
            names.append(name)
            rankers.append(by_arm[name] or default)
        return names, rankers


class ExperimentWatcher:
    def __init__(
        self,
        client_factory: Callable[[], Any],
        models_dir: Path,
        slot: ModelSlot,
        *,
        load: Callable[[Path], Any],
        list_versions: Callable[[Path], list[Path]],
        interval_s: float = 1.0,
        metrics: RankingMetrics | None = None,
        key: str = KEY,
    ) -> None:
        self._client_factory = client_factory
        self._client: Any = None
        self._dir = Path(models_dir)
        self._slot = slot
        self._load = load
        self._list = list_versions
        self._interval = interval_s
        self._metrics = metrics or RankingMetrics()
        self._key = key
        self.current: Routing | None = None  # read by every batch
        self._raw: bytes | None = None  # the state last acted on
        self._rankers: dict[str, Any] = {}  # version -> loaded ranker, for the versions in use
        self._refused: set[str] = set()
        self._missing: set[str] = set()  # versions the experiment names that are not (yet) in the folder
        self._experiment: Experiment | None = None  # the active experiment routed by
        self._failing = False  # a poll error was logged; the next success says so
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experiment-poll")
        self._task: asyncio.Task | None = None

    @property
    def refused(self) -> frozenset[str]:
        return frozenset(self._refused)

    def poll_once(self) -> Any:
        """Read the state; a new Routing (or None: no experiment) when it changed. Blocking."""
        try:
            if self._client is None:
                self._client = self._client_factory()
            raw = self._client.get(self._key)
        except Exception as exc:  # Redis down or slow: keep routing as before
            self._metrics.experiment_state_errors.inc()
            if not self._failing:
                log.warning("cannot read the experiment state (%s); routing stays as it is", exc)
                self._failing = True
            return _UNCHANGED
        if self._failing:
            log.info("experiment state readable again")
            self._failing = False
        if raw == self._raw:
            if self._missing and self._experiment is not None and self._missing_arrived():
                return self._routing(self._experiment)  # a version the experiment named appeared
            return _UNCHANGED
        self._raw = raw
        self._experiment = None
        self._missing.clear()
        if raw is None:
            self._rankers.clear()
            return None
        try:
            experiment = decode(raw)
        except InvalidExperiment as exc:
            self._metrics.experiment_state_errors.inc()
            log.error("experiment state in %s refused: %s; routing stays as it is", self._key, exc)
            return _UNCHANGED
        self._metrics.experiment_generation.set(experiment.generation)
        if not experiment.active:
            self._rankers.clear()
            return None
        self._experiment = experiment
        return self._routing(experiment)

    def _missing_arrived(self) -> bool:
        names = {Path(p).name for p in self._list(self._dir)}
        return any(version in names for version in self._missing)

    def _routing(self, experiment: Experiment) -> Routing:
        wanted = {arm.version for arm in experiment.arms}
        for version in list(self._rankers):
            if version not in wanted:
                del self._rankers[version]  # no longer named: let it go
        by_arm: dict[str, Any] = {}
        for arm in experiment.arms:
            ranker = self._ranker(arm.version)
            by_arm[arm.name] = ranker
            if ranker is None:
                self._metrics.experiment_fallbacks.inc()
                log.error(
                    "experiment %s: arm %s's version %s is refused; the arm is served by the default "
                    "version%s",
                    experiment.name,
                    arm.name,
                    arm.version,
                    " (as a shadow: not scored)" if arm.shadow else "",
                )
        shadow = experiment.shadow
        shadow_model = None
        if shadow is not None and by_arm[shadow.name] is not None:
            shadow_model = ShadowModel(shadow.name, shadow.version, by_arm[shadow.name])
        return Routing(experiment, by_arm, shadow_model)

    def _ranker(self, version: str) -> Any:
        current = self._slot.current
        if current is not None and current.version == version:
            return current  # the default version itself: no second copy
        if version in self._rankers:
            return self._rankers[version]
        if version in self._refused:
            return None
        if version not in {Path(p).name for p in self._list(self._dir)}:
            if version not in self._missing:
                log.error("experiment names version %s, not a complete version in %s", version, self._dir)
            self._missing.add(version)
            return None  # may be published later: the folder is listed again every poll meanwhile
        self._missing.discard(version)
        try:
            ranker = self._load(self._dir / version)
        except Exception as exc:  # the same refusal as hot reload: once, never retried
            self._refused.add(version)
            self._metrics.model_reloads.labels("failure").inc()
            log.error("model version %s (experiment) refused: %s", version, exc)
            return None
        self._rankers[version] = ranker
        log.info("experiment version %s loaded", version)
        return ranker

    async def check_now(self) -> bool:
        """One poll off the event loop; True when the routing changed."""
        routing = await asyncio.get_running_loop().run_in_executor(self._pool, self.poll_once)
        if routing is _UNCHANGED:
            return False
        self.current = routing
        if routing is None:
            log.info("no experiment running: every request served by the default version")
        else:
            log.info(
                "experiment %s (generation %d): %r",
                routing.experiment.name,
                routing.experiment.generation,
                routing.experiment.assignment,
            )
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_now()
            except Exception:  # an unexpected error must not end experiment routing for good
                log.exception("experiment watcher poll failed")

    async def start(self) -> None:
        try:
            await self.check_now()  # route by the running experiment from the first call
        except Exception:
            log.exception("experiment watcher poll failed")
        self._task = asyncio.get_running_loop().create_task(self.run(), name="experiment-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
