"""Item vocabulary: item id (string) <-> row of the embedding tables, and which items may be recommended.

Row 0 is padding (an empty history slot), row 1 the unknown item (ids never seen in training,
or seen too rarely to learn a row of their own); known items start at row 2.

Each known item carries a *recommendable* flag: set at training by :mod:`recstack.catalogue`
(service lines such as postage are not), stored with the model version. An item the vocabulary
does not know (first seen live) is recommendable unless that definition says otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from recstack.catalogue import is_recommendable

PAD = 0
OOV = 1
FIRST_ITEM_ROW = 2


class ItemVocab:
    """Maps item ids to embedding rows; unknown ids map to :data:`OOV`.

    ``recommendable``: one flag per item id (default: by :func:`recstack.catalogue.is_recommendable`).
    """

    def __init__(
        self, item_ids: Sequence[str], recommendable: Sequence[bool] | np.ndarray | None = None
    ) -> None:
        self.item_ids: list[str] = list(item_ids)
        self._index = {item: row for row, item in enumerate(self.item_ids, FIRST_ITEM_ROW)}
        if len(self._index) != len(self.item_ids):
            raise ValueError("item vocabulary has duplicate ids")
        if recommendable is None:
            recommendable = [is_recommendable(item) for item in self.item_ids]
        self.recommendable = np.asarray(recommendable, dtype=bool).reshape(-1)
        if len(self.recommendable) != len(self.item_ids):
            raise ValueError(
                f"recommendable has {len(self.recommendable)} flags for {len(self.item_ids)} item ids"
            )

    def is_recommendable(self, item_id: str) -> bool:
        """The item's flag; for an item not in the vocabulary, the shared definition."""
        row = self._index.get(item_id)
        if row is None:
            return is_recommendable(item_id)
        return bool(self.recommendable[row - FIRST_ITEM_ROW])

    def recommendable_rows(self) -> np.ndarray:
        """``len(self)`` bools, one per embedding row: padding and unknown rows are False."""
        return np.concatenate([np.zeros(FIRST_ITEM_ROW, dtype=bool), self.recommendable])

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
