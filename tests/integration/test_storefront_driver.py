"""``recstack storefront`` against a real ranking server (a small model) and the real broker.

The world's history is published first, then every impression is a real ``Rank`` call; what
reaches the topic must be exactly the events the run reports, each valid under the contract and
keyed by its user, and the hidden preference the test knows must show in what users did.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_popularity_baseline_served import server_for
from test_ranking_server import V1, publish_model
from test_stream_exactly_once import dead_letters as read_records

from loadtests.storefront import run_storefront
from recstack.events import validate
from recstack.experiments.simulate import Storefront, StorefrontConfig

pytestmark = pytest.mark.integration

USERS, ITEMS, SEED, IMPRESSIONS = 200, 60, 3, 400


def test_impressions_through_the_real_server_produce_the_users_events(
    redis_url: str, kafka_bootstrap: str, fresh_topic, tmp_path: Path
):
    shop = Storefront(StorefrontConfig(n_users=USERS, n_items=ITEMS), SEED)
    models = tmp_path / "models"
    publish_model(models, V1, seed=1, items=shop.item_ids)
    topic = fresh_topic(3)
    server = server_for(models, redis_url)
    try:
        target = f"127.0.0.1:{server.port}"
        result = run_storefront(
            target,
            kafka_bootstrap,
            topic=topic,
            users=USERS,
            items=ITEMS,
            impressions=IMPRESSIONS,
            candidates=30,
            seed=SEED,
            history=True,
            progress=False,
            run_id="run1",
            client_options={},
        )
        # Recommend: the server picks the items (from the model's vocabulary: the world's items).
        recommended = run_storefront(
            target,
            kafka_bootstrap,
            topic=topic,
            users=USERS,
            items=ITEMS,
            impressions=50,
            seed=SEED + 1,
            recommend=True,
            progress=False,
            run_id="run2",
            client_options={},
        )
    finally:
        server.close()
    assert result.impressions == IMPRESSIONS and result.failed == 0
    history = shop.history()
    assert result.history_events == len(history)

    assert recommended.impressions == 50 and recommended.failed == 0 and recommended.history_events == 0
    expected = result.history_events + sum(result.events.values()) + sum(recommended.events.values())
    records = read_records(kafka_bootstrap, topic, expected)
    assert len(records) == expected
    live: list = []
    run2: Counter = Counter()
    for record in records:
        event = validate(json.loads(record.value))
        assert record.key == event.user_id.encode()
        if event.session_id.startswith("run1-"):
            live.append(event)
        elif event.session_id.startswith("run2-"):
            run2[event.event_type] += 1
    assert run2 == recommended.events
    assert Counter(e.event_id for e in live).most_common(1)[0][1] == 1
    assert Counter(e.event_type for e in live) == result.events
    assert sum(e.event_type == "view" for e in live) > 50
    sessions = {int(e.session_id.split("-")[1]) for e in live}
    assert max(sessions) < IMPRESSIONS

    # The hidden preference shows: the (user, item) pairs viewed have a far higher hidden utility
    # than those shown (random pages ranked by a random model).
    def utility(kind: str) -> np.ndarray:
        pairs = [(int(e.user_id[1:]), shop.item_index[e.item_id]) for e in live if e.event_type == kind]
        return np.array([shop.utility[u, i] for u, i in pairs])

    viewed = utility("view")
    assert viewed.mean() == pytest.approx(result.acted_utility, abs=1e-9)
    margin = 3 * viewed.std() / np.sqrt(len(viewed))
    assert viewed.mean() > result.shown_utility + margin
    assert result.preferred_view_rate > 1.5 * result.other_view_rate
    assert result.views_by_position[0] > result.views_by_position[-1]  # position bias
