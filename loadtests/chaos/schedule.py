"""The faults ``recstack chaos`` will inject, in the order it injects them, and how long each one runs.

The faults themselves (spec and code) are the registry's, :mod:`loadtests.chaos.faults`; this
module turns ``--faults`` and ``--quick`` into the list the run goes through. Each fault gets one
window of steady ranking traffic (:class:`FaultSpec`): ``pre_s`` of normal service, the fault for
``hold_s``, ``post_s`` to recover.
"""

from __future__ import annotations

from dataclasses import replace

from loadtests.chaos import faults
from loadtests.chaos.faults.base import FaultSpec
from recstack.errors import UserError

FAULTS: tuple[FaultSpec, ...] = tuple(f.spec for f in faults.registered())  # every fault, in run order
FAULT_NAMES = tuple(f.name for f in FAULTS)


def plan(names: list[str] | None = None, quick: bool = False) -> list[FaultSpec]:
    """The faults to inject, in the canonical order; ``quick`` shortens the quiet parts of each window.

    ``names`` None or empty means all of them; an unknown name is a :class:`UserError`.
    """
    known = [f.spec for f in faults.registered()]
    known_names = [f.name for f in known]
    wanted = list(dict.fromkeys(names or known_names))
    unknown = [n for n in wanted if n not in known_names]
    if unknown:
        raise UserError(f"--faults: unknown fault(s) {', '.join(unknown)}; known: {', '.join(known_names)}")
    chosen = [f for f in known if f.name in wanted]
    if quick:
        chosen = [replace(f, pre_s=2.0, post_s=6.0) for f in chosen]
    return chosen


def parse_fault_list(text: str) -> list[str]:
    """``"consumer-kill, redis-restart"`` -> names (``all`` or empty: every fault)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    return [] if names == ["all"] else names


__all__ = ["FAULTS", "FAULT_NAMES", "FaultSpec", "parse_fault_list", "plan"]
