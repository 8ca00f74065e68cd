"""Which compute path serves a request: decided per request, from evidence, confidence and load."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

PATHS = ("light", "full", "cascade")


@dataclass(frozen=True)
class RouterConfig:
    # Cascade: the light path scores every candidate, the full path re-scores the best
    # max(cascade_head, cascade_head_fraction x candidates) of them. 20 of the server's usual 100
    # costs ~1/4 of always-full; the fraction widens the head for long lists (ranking a whole
    # catalogue of ~4k items re-scores ~80), where a fixed 20 lost ~1% NDCG@10 on Online Retail.
    cascade_head: int = 20
    cascade_head_fraction: float = 0.02
    # Load (0..1, from the server: queue depth / capacity) at which the head starts to shrink...
    shrink_from_load: float = 0.5
    min_head: int = 10  # ...down to this (still covers the top 10 a client usually shows)...
    # ...and at which every request takes the light path: the SLO holds, quality drops a little.
    light_from_load: float = 0.85
    # The shrinking head moves in steps of this many (20, 15, 10): each head size is one
    # compiled graph (models.compiled), and a step of 5 re-scores no measurably worse than 1.
    head_step: int = 5

    def __post_init__(self) -> None:
        if self.cascade_head < 1 or not 1 <= self.min_head <= self.cascade_head:
            raise ValueError("need 1 <= min_head <= cascade_head")
        if self.head_step < 1:
            raise ValueError("need head_step >= 1")
        if not 0.0 <= self.cascade_head_fraction <= 1.0:
            raise ValueError("need 0 <= cascade_head_fraction <= 1")
        if not 0.0 <= self.shrink_from_load <= self.light_from_load <= 1.0:
            raise ValueError("need 0 <= shrink_from_load <= light_from_load <= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Route:
    path: str  # "light" | "full" | "cascade"
    head: int = 0  # cascade only: how many light-ranked candidates the full path re-scores


class PathRouter:
    """Per request: cold users -> light (the full path has no history to attend to); warm users ->
    cascade, its head shrinking as load grows, light past ``light_from_load``; ``force`` overrides."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()

    def head_for(self, n_candidates: int, load: float = 0.0) -> int:
        """Cascade head size for a request of ``n_candidates`` at ``load``."""
        c = self.config
        head = max(c.cascade_head, math.ceil(c.cascade_head_fraction * n_candidates))
        if load <= c.shrink_from_load:
            return head
        span = max(c.light_from_load - c.shrink_from_load, 1e-9)
        frac = min(1.0, (load - c.shrink_from_load) / span)
        shrunk = c.head_step * round((head - frac * (head - c.min_head)) / c.head_step)
        return max(c.min_head, min(head, shrunk))

    def heads(self, n_candidates: int) -> list[int]:
        """Every cascade head a request of up to ``n_candidates`` can get, at any load."""
        return sorted({self.head_for(n_candidates, load / 100) for load in range(101)})

    def route(
        self, has_history: bool, n_candidates: int, load: float = 0.0, force: str | None = None
    ) -> Route:
        if force is not None:
            if force not in PATHS:
                raise ValueError(f"force_path must be one of {PATHS}, got {force!r}")
            if force == "cascade":
                return Route("cascade", min(self.head_for(n_candidates), n_candidates))
            return Route(force)
        if not has_history or load >= self.config.light_from_load:
            return Route("light")
        head = self.head_for(n_candidates, load)
        if n_candidates <= head:
            return Route("full")  # re-scoring everything costs no more than a cascade would
        return Route("cascade", head)
