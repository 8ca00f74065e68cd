"""On a Redis Cluster, a retried batch leaves out exactly the effects that slots already hold.

The consumer modules are imported inside the tests: importing kafka-python at collection time
warns outside pytest's warning filters.
"""

from __future__ import annotations

from types import SimpleNamespace

from recstack.events import Event


class SlotsByName:
    """Slots of the cluster writer, faked: an entity's slot is the number after its dash."""

    def user_slot(self, user_id: str) -> int:
        return int(user_id.split("-")[1])

    def item_slot(self, item_id: str) -> int:
        return int(item_id.split("-")[1])


def _batch(events: list[tuple[int, int, Event]]):
    from services.stream.pipeline import Batch, Plan

    records = [SimpleNamespace(partition=p, offset=o) for p, o, _ in events]
    batch = Batch(records, [ev for _, _, ev in events], 0.0, {})
    batch.plan = Plan(apply=list(range(len(events))))
    return batch


def _deltas(batch):
    from services.stream.consumer import StreamConsumer

    owner = SimpleNamespace(_writer=SlotsByName(), _half_life_ms=3_600_000.0)
    return StreamConsumer._cluster_deltas(owner, batch)  # type: ignore[arg-type]


def test_without_floors_every_event_counts_and_each_slot_knows_its_partitions():
    batch = _batch(
        [
            (0, 10, Event("e1", "u-1", "i-7", "view", 1)),
            (0, 11, Event("e2", "u-1", "i-8", "purchase", 2)),
            (3, 5, Event("e3", "u-2", "i-7", "view", 3)),
        ]
    )
    users, items, slots = _deltas(batch)
    assert (users["u-1"].views, users["u-1"].purchases, users["u-2"].views) == (1, 1, 1)
    assert (items["i-7"].views, items["i-8"].purchases) == (2, 1)
    assert slots == {1: {0}, 2: {3}, 7: {0, 3}, 8: {0}}


def test_floors_leave_out_what_a_slot_holds_per_partition_and_nothing_else():
    batch = _batch(
        [
            (0, 10, Event("e1", "u-1", "i-7", "view", 1)),
            (0, 11, Event("e2", "u-1", "i-8", "purchase", 2)),
            (3, 5, Event("e3", "u-2", "i-7", "view", 3)),
        ]
    )
    # slot 1 (user u-1) holds partition 0 up to offset 10; slot 7 holds partition 3 up to 5
    batch.floors = {(1, 0): 10, (7, 3): 5}
    users, items, slots = _deltas(batch)
    assert (users["u-1"].views, users["u-1"].purchases) == (0, 1)  # e1 is in slot 1 already
    assert users["u-2"].views == 1
    assert items["i-7"].views == 1  # e1 counts for the item (slot 7, partition 0), e3 does not
    assert items["i-8"].purchases == 1
    assert slots == {1: {0}, 2: {3}, 7: {0}, 8: {0}}
    # a slot that holds everything of the batch is left out altogether
    batch.floors = {(1, 0): 11, (2, 3): 5, (7, 0): 10, (7, 3): 5, (8, 0): 11}
    users, items, slots = _deltas(batch)
    assert users == {} and items == {} and slots == {}
