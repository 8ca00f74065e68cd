"""Model lifecycle: the slot holding the served model, and the watcher that hot-swaps newer versions.

The watcher polls the models folder from a background task. Listing, checksum verification,
loading and warm-up all run in a worker thread, never on a request's path; the new model
replaces the old one with a single reference assignment, so a batch computes entirely with
the model it started with and no call fails during a swap. A version that fails to verify or
load is refused once (logged and counted) and never retried; the current one keeps serving.

A ``DEFAULT`` pointer in the folder (:func:`models.artifacts.write_default`) overrides "the
newest": the watcher serves the version it names, and only that one while it exists. A pointer
naming a missing or refused version is refused with a warning and the served version stays (with
nothing served yet, the newest valid version is served meanwhile).

A version's identity is its folder name, nothing else: the watcher compares folder names with the
folder it swapped in, never with what the version's own files say (``config.json`` keeps the name
it was trained under, which differs once a version is promoted or copied under another name).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from services.ranking.metrics import RankingMetrics
from services.ranking.tasks import cancel_and_wait

log = logging.getLogger(__name__)
_NO_POINTER = object()

# version_dir -> a warmed-up ranker; raises on a bad version.
LoadFn = Callable[[Path], Any]
# models_dir -> version folders, oldest first.
ListFn = Callable[[Path], list[Path]]
# models_dir -> the version the DEFAULT pointer names, or None without one.
PointerFn = Callable[[Path], str | None]


class ModelSlot:
    """The model currently served (``None`` until the first version loads)."""

    def __init__(self, ranker: Any = None) -> None:
        self.current = ranker

    @property
    def version(self) -> str | None:
        return None if self.current is None else self.current.version


class ModelWatcher:
    def __init__(
        self,
        models_dir: Path,
        slot: ModelSlot,
        *,
        list_versions: ListFn,
        load: LoadFn,
        executor: Executor,
        interval_s: float = 2.0,
        metrics: RankingMetrics | None = None,
        on_swap: Callable[[Any], None] | None = None,
        read_pointer: PointerFn | None = None,
    ) -> None:
        self._dir = Path(models_dir)
        self._read_pointer = read_pointer
        self._pointer_warned: str | None = None  # the bad pointer already warned about
        self._slot = slot
        self._list = list_versions
        self._load = load
        self._executor = executor
        self._interval = interval_s
        self._metrics = metrics or RankingMetrics()
        self.on_swap = on_swap
        self._refused: set[str] = set()
        self._task: asyncio.Task | None = None
        self._missing_dir_logged = False
        # Folder name of the version in the slot, and of the one poll_once loaded last (not yet swapped).
        self._served: str | None = None
        self._loaded: tuple[Any, str] | None = None

    @property
    def refused(self) -> frozenset[str]:
        return frozenset(self._refused)

    def poll_once(self) -> Any | None:
        """Load the newest valid version newer than the served one; return it, or None. Blocking."""
        if not self._dir.is_dir():
            if not self._missing_dir_logged:
                log.warning("models folder %s does not exist (yet); waiting for a model version", self._dir)
                self._missing_dir_logged = True
            return None
        self._missing_dir_logged = False
        # A slot filled before the watcher started names its version by its folder too (load_version).
        current = self._served if self._served is not None else self._slot.version
        if self._read_pointer is not None:
            outcome = self._follow_pointer(current)
            if outcome is not _NO_POINTER:
                return outcome
        for version_dir in reversed(self._list(self._dir)):
            name = Path(version_dir).name
            if name == current:
                return None  # everything newer was refused
            if name in self._refused:
                continue
            try:
                ranker = self._load(Path(version_dir))
            except Exception as exc:  # any failure refuses the version; the current one keeps serving
                self._refused.add(name)
                self._metrics.model_reloads.labels("failure").inc()
                log.error("model version %s refused: %s", name, exc)
                continue
            if current is not None and name < current:
                # Only reached when the served version vanished from the folder; keep the newest valid.
                log.warning("model version %s is gone from %s; falling back to %s", current, self._dir, name)
            self._loaded = (ranker, name)
            return ranker
        return None

    def _follow_pointer(self, current: str | None) -> Any:
        """The version DEFAULT names, loaded (or None: nothing to swap); _NO_POINTER when there is
        no pointer, or it is bad and nothing is served yet (the newest valid version then)."""
        try:
            pointer = self._read_pointer(self._dir)  # type: ignore[misc]
        except Exception as exc:
            pointer, problem = "", f"cannot be read: {exc}"
        else:
            if pointer is None:
                self._pointer_warned = None
                return _NO_POINTER
            problem = None
        if pointer == current:
            self._pointer_warned = None
            return None
        if problem is None:
            names = {Path(p).name for p in self._list(self._dir)}
            if pointer in self._refused:
                problem = "was refused"
            elif pointer not in names:
                problem = "is not a complete version folder"
        if problem is None:
            try:
                ranker = self._load(self._dir / pointer)
            except Exception as exc:  # refused once, never retried, like any version
                self._refused.add(pointer)
                self._metrics.model_reloads.labels("failure").inc()
                problem = f"was refused: {exc}"
            else:
                self._pointer_warned = None
                self._loaded = (ranker, pointer)
                return ranker
        if self._pointer_warned != pointer:
            self._pointer_warned = pointer
            keep = f"keeping {current}" if current else "serving the newest valid version meanwhile"
            log.warning("%s/DEFAULT names %r, which %s; %s", self._dir, pointer, problem, keep)
        return None if current is not None else _NO_POINTER

    def swap(self, ranker: Any) -> None:
        previous = self._served
        loaded, self._loaded = self._loaded, None
        self._served = loaded[1] if loaded is not None and loaded[0] is ranker else str(ranker.version)
        self._slot.current = ranker
        self._metrics.model_reloads.labels("success").inc()
        self._metrics.model.info({"version": self._served})
        log.info("serving model version %s (was %s)", self._served, previous or "none")
        if self.on_swap is not None:
            self.on_swap(ranker)

    async def check_now(self) -> bool:
        """One poll off the event loop; True when a new version was swapped in."""
        loop = asyncio.get_running_loop()
        ranker = await loop.run_in_executor(self._executor, self.poll_once)
        if ranker is None:
            return False
        self.swap(ranker)
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.check_now()
            except Exception:  # a listing error must not end hot reload for good
                log.exception("model watcher poll failed")
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="model-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
