"""Calling recstack from Python: the ranking clients, the channel factory, the event publisher.

See the README's "Calling recstack from Python".
"""

from recstack.client.channel import (
    DEFAULT_RETRY,
    RetryPolicy,
    make_aio_channel,
    make_channel,
    settings_from_env,
)
from recstack.client.publisher import EventPublisher, PublishError
from recstack.client.ranking import (
    DEFAULT_DEADLINE_S,
    AsyncRankingClient,
    FailedCall,
    RankedItem,
    Ranking,
    RankingClient,
    RankingError,
    in_request_order,
)

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_RETRY",
    "AsyncRankingClient",
    "EventPublisher",
    "FailedCall",
    "PublishError",
    "RankedItem",
    "Ranking",
    "RankingClient",
    "RankingError",
    "RetryPolicy",
    "in_request_order",
    "make_aio_channel",
    "make_channel",
    "settings_from_env",
]
