"""Stable arm assignment: the same user always lands in the same arm of an experiment.

A user's bucket is the first 8 bytes of BLAKE2b keyed with the experiment's salt over the UTF-8
``user_id``, read as an unsigned integer in ``[0, 2**64)``. The live arms split that range by their
cumulative traffic shares; a shadow arm gets no traffic (it scores the live arm's batches on the
side). Nothing here depends on the process: no Python ``hash()`` (salted per process by
``PYTHONHASHSEED``), no random state, so every ranking replica and every replay of a log assigns
alike. A new salt reshuffles users independently of the old split, which is how a new experiment
avoids inheriting the last one's winners and losers.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import blake2b

# Shares are written by people ("0.5, 0.3, 0.2"): a sum within this of 1 is 1.
SHARE_TOLERANCE = 1e-6
_SPACE = 1 << 64  # buckets are 64-bit integers; shares become integer bounds, so no float drift
MAX_SALT_BYTES = 64  # BLAKE2b's key length limit


class InvalidExperiment(ValueError):
    """An experiment definition that cannot be served; the message names the field and the reason."""


@dataclass(frozen=True, slots=True)
class Arm:
    """One arm: a name (as reported), the model ``version`` it serves and its traffic ``share``.

    ``shadow`` arms must have share 0: they never answer a request."""

    name: str
    version: str
    share: float = 0.0
    shadow: bool = False


def bucket(salt: str, user_id: str) -> int:
    """The user's position in ``[0, 2**64)`` for this salt (see the module docstring)."""
    return int.from_bytes(blake2b(user_id.encode(), digest_size=8, key=salt.encode()).digest(), "big")


def unit(salt: str, user_id: str) -> float:
    """:func:`bucket` scaled to ``[0, 1)``: for reading and plotting, not for assignment."""
    return bucket(salt, user_id) / _SPACE


class Assignment:
    """The split of one experiment: ``arm_for(user_id)`` on the ranking hot path.

    Raises :class:`InvalidExperiment` for an empty arm list, a duplicate name, a negative, NaN or
    infinite share, a shadow arm with traffic, or live shares that do not sum to 1."""

    __slots__ = ("salt", "arms", "live", "shadows", "_bounds", "_live_arms", "_key")

    def __init__(self, salt: str, arms: Iterable[Arm]) -> None:
        arms = tuple(arms)
        _check(salt, arms)
        self.salt = salt
        self.arms = arms
        self.live = tuple(a for a in arms if not a.shadow and a.share > 0)
        self.shadows = tuple(a for a in arms if a.shadow)
        # Integer upper bounds of each live arm's range; the last is exactly 2**64 so that rounding
        # of the shares can never leave a user without an arm.
        bounds: list[int] = []
        total = 0.0
        for arm in self.live:
            total += arm.share
            bounds.append(min(_SPACE, round(total * _SPACE)))
        bounds[-1] = _SPACE
        self._bounds = tuple(bounds)
        self._live_arms = self.live
        self._key = salt.encode()

    def arm_for(self, user_id: str) -> Arm:
        """The live arm that serves ``user_id``; always the same one for this salt and split."""
        h = int.from_bytes(blake2b(user_id.encode(), digest_size=8, key=self._key).digest(), "big")
        return self._live_arms[bisect_right(self._bounds, h)]

    def __repr__(self) -> str:
        split = ", ".join(f"{a.name}={a.share:g}" for a in self.live)
        shadow = "".join(f", shadow {a.name}" for a in self.shadows)
        return f"Assignment(salt={self.salt!r}: {split}{shadow})"


def _check(salt: str, arms: tuple[Arm, ...]) -> None:
    if not isinstance(salt, str) or not salt:
        raise InvalidExperiment("salt: must be a non-empty string")
    if len(salt.encode()) > MAX_SALT_BYTES:
        raise InvalidExperiment(f"salt: at most {MAX_SALT_BYTES} bytes of UTF-8, got {len(salt.encode())}")
    if not arms:
        raise InvalidExperiment("arms: an experiment needs at least one arm, got none")
    seen: set[str] = set()
    for i, arm in enumerate(arms):
        where = f"arms[{i}] ({arm.name!r})"
        if not isinstance(arm.name, str) or not arm.name:
            raise InvalidExperiment(f"arms[{i}].name: must be a non-empty string")
        if arm.name in seen:
            raise InvalidExperiment(f"{where}.name: duplicate arm name")
        seen.add(arm.name)
        if not isinstance(arm.version, str) or not arm.version:
            raise InvalidExperiment(f"{where}.version: must name a model version")
        share = arm.share
        if isinstance(share, bool) or not isinstance(share, int | float) or not math.isfinite(share):
            raise InvalidExperiment(f"{where}.share: must be a finite number, got {share!r}")
        if share < 0:
            raise InvalidExperiment(f"{where}.share: must be >= 0, got {share:g}")
        if arm.shadow and share != 0:
            raise InvalidExperiment(
                f"{where}.share: a shadow arm takes no traffic, so its share must be 0, got {share:g}"
            )
    total = math.fsum(a.share for a in arms if not a.shadow)
    if abs(total - 1.0) > SHARE_TOLERANCE:
        shares = ", ".join(f"{a.name}={a.share:g}" for a in arms if not a.shadow)
        raise InvalidExperiment(f"arms.share: the live arms' shares must sum to 1, got {total:g} ({shares})")
