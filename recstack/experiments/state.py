"""The running experiment's state in Redis: one key every ranking replica polls.

``recstack:experiment`` holds one JSON object::

    {"name": "ranker-vs-popularity", "salt": "ranker-vs-popularity", "active": true,
     "arms": [{"name": "A", "version": "v20240102-000000", "share": 0.5, "shadow": false}, ...],
     "started_at": 1767225600000, "generation": 7, "ended_at": null, "promoted": null}

It is written whole, with one SET inside a WATCH/MULTI transaction that also bumps
``generation`` (so concurrent writers never reuse a generation, and a replica can tell a new state
from the one it routes by). ``stop`` and ``promote`` keep the definition with ``active`` false, so
``status`` still says what ran last. A definition is checked with :mod:`.assign`'s rules before it
is written, and again when read: a replica never routes by a state it could not have written.

Kept free of heavy imports (only the standard library and :mod:`.assign`): the server polls it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from recstack.experiments.assign import Arm, Assignment, InvalidExperiment

KEY = "recstack:experiment"
MAX_NAME_LENGTH = 128


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    arms: tuple[Arm, ...]
    started_at: int = 0  # epoch ms
    generation: int = 0  # set by write(); 0 = never written
    active: bool = True
    ended_at: int | None = None  # epoch ms of stop or promote
    promoted: str | None = None  # the arm promote made the default
    assignment: Assignment = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidExperiment("name: must be a non-empty string")
        if len(self.name) > MAX_NAME_LENGTH:
            raise InvalidExperiment(f"name: at most {MAX_NAME_LENGTH} characters, got {len(self.name)}")
        if not isinstance(self.generation, int) or self.generation < 0:
            raise InvalidExperiment(f"generation: must be an integer >= 0, got {self.generation!r}")
        if not isinstance(self.started_at, int) or self.started_at < 0:
            raise InvalidExperiment(f"started_at: must be epoch milliseconds, got {self.started_at!r}")
        # assign.py's checks: salt, arm names, versions, shares, shadows.
        object.__setattr__(self, "assignment", Assignment(self.salt, self.arms))

    @property
    def shadow(self) -> Arm | None:
        return self.assignment.shadows[0] if self.assignment.shadows else None

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise InvalidExperiment(
            f"arm {name!r}: experiment {self.name!r} has arms {', '.join(a.name for a in self.arms)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "salt": self.salt,
            "active": self.active,
            "arms": [
                {"name": a.name, "version": a.version, "share": a.share, "shadow": a.shadow}
                for a in self.arms
            ],
            "started_at": self.started_at,
            "generation": self.generation,
            "ended_at": self.ended_at,
            "promoted": self.promoted,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Experiment:
        if not isinstance(data, dict):
            raise InvalidExperiment(f"state: must be a JSON object, got {type(data).__name__}")
        try:
            arms_raw = data["arms"]
            if not isinstance(arms_raw, list):
                raise InvalidExperiment("arms: must be a list")
            arms = []
            for i, a in enumerate(arms_raw):
                if not isinstance(a, dict):
                    raise InvalidExperiment(f"arms[{i}]: must be an object")
                arms.append(Arm(a["name"], a["version"], a.get("share", 0.0), bool(a.get("shadow", False))))
            return cls(
                name=data["name"],
                salt=data["salt"],
                arms=tuple(arms),
                started_at=data.get("started_at", 0),
                generation=data.get("generation", 0),
                active=bool(data.get("active", True)),
                ended_at=data.get("ended_at"),
                promoted=data.get("promoted"),
            )
        except KeyError as exc:
            raise InvalidExperiment(f"state: field {exc.args[0]!r} is missing") from None


def new_experiment(name: str, arms: list[Arm], salt: str | None = None) -> Experiment:
    """A definition to start now (salt defaults to the name: a new name reshuffles users)."""
    if len([a for a in arms if a.shadow]) > 1:
        raise InvalidExperiment("arms: at most one shadow arm")
    return Experiment(name=name, salt=salt or name, arms=tuple(arms), started_at=time.time_ns() // 1_000_000)


def decode(raw: bytes | str) -> Experiment:
    """The state as stored, checked; InvalidExperiment naming what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidExperiment(f"state: not JSON: {exc}") from None
    return Experiment.from_dict(data)


def read(client: Any, key: str = KEY) -> Experiment | None:
    """The stored state (active or not), or None when nothing was ever written."""
    raw = client.get(key)
    return None if raw is None else decode(raw)


def write(
    client: Any,
    experiment: Experiment,
    key: str = KEY,
    *,
    replace_active: bool = False,
    expect_generation: int | None = None,
) -> Experiment:
    """Store ``experiment`` with the next generation, atomically; returns it as stored.

    Refuses (InvalidExperiment) to replace an active experiment unless ``replace_active``: two
    operators starting experiments at once must not silently overwrite each other."""

    stored: list[Experiment] = []

    def transaction(pipe: Any) -> None:
        raw = pipe.get(key)
        previous = decode(raw) if raw is not None else None
        if expect_generation is not None and (previous.generation if previous else 0) != expect_generation:
            raise InvalidExperiment("experiment: the state changed meanwhile (another operator?); try again")
        if (
            previous is not None
            and previous.active
            and experiment.active
            and not replace_active
            and previous.name != experiment.name
        ):
            raise InvalidExperiment(
                f"name: experiment {previous.name!r} is running; stop or promote it first"
            )
        generation = (previous.generation if previous is not None else 0) + 1
        new = replace(experiment, generation=generation)
        pipe.multi()
        pipe.set(key, json.dumps(new.to_dict(), separators=(",", ":")))
        stored[:] = [new]

    client.transaction(transaction, key)
    return stored[0]


def end(client: Any, key: str = KEY, *, promoted: str | None = None) -> Experiment:
    """Mark the running experiment stopped (or promoted); InvalidExperiment when none runs."""
    current = read(client, key)
    if current is None or not current.active:
        raise InvalidExperiment("experiment: none is running")
    ended = replace(current, active=False, ended_at=time.time_ns() // 1_000_000, promoted=promoted)
    return write(client, ended, key, expect_generation=current.generation)
