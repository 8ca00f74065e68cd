"""Item vocabulary: item id (string) <-> row of the embedding tables.

Row 0 is padding (an empty history slot), row 1 the unknown item (ids never seen in training,
or seen too rarely to learn a row of their own); known items start at row 2.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

PAD = 0
OOV = 1
FIRST_ITEM_ROW = 2


class ItemVocab:
    """Maps item ids to embedding rows; unknown ids map to :data:`OOV`."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.item_ids: list[str] = list(item_ids)
        self._index = {item: row for row, item in enumerate(self.item_ids, FIRST_ITEM_ROW)}
        if len(self._index) != len(self.item_ids):
            raise ValueError("item vocabulary has duplicate ids")

    def __len__(self) -> int:
        """Number of embedding rows, padding and unknown included."""
        return len(self.item_ids) + FIRST_ITEM_ROW

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    def row(self, item_id: str) -> int:
        return self._index.get(item_id, OOV)

    def rows(self, item_ids: Iterable[str]) -> np.ndarray:
        return np.fromiter(map(self._index.get, item_ids, itertools.repeat(OOV)), dtype=np.int64)

    def item(self, row: int) -> str | None:
        """The item id of a known row, None for padding and unknown."""
        return self.item_ids[row - FIRST_ITEM_ROW] if row >= FIRST_ITEM_ROW else None
