"""Feast definitions of the recstack feature repository (docs/CONTRACT.md section 4).

``feast apply`` executes this file (the other modules of the folder are listed in
``.feastignore``), and :mod:`feature_store.store` applies the same objects in code. Names and
types here are the single source of truth: :mod:`feature_store.layout` derives the Redis layout
from them. Every feature is described in ``docs/FEATURES.md``.
"""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, Project, PushSource
from feast.types import Array, Float32, Int64, String
from feast.value_type import ValueType

PROJECT_NAME = "recstack"
USER_VIEW = "user_activity"
ITEM_VIEW = "item_popularity"
# Feast needs an offline (batch) source behind each push source. The stream writes online only,
# so these files are never read unless someone materialises or asks for historical features.
TIMESTAMP_FIELD = "event_timestamp"

project = Project(name=PROJECT_NAME, description="Real-time recommendation features")

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A storefront user (docs/CONTRACT.md section 3, user_id)",
)
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalogue item (docs/CONTRACT.md section 3, item_id)",
)

user_activity_push = PushSource(
    name="user_activity_push",
    batch_source=FileSource(
        name="user_activity_batch",
        path="data/user_activity.parquet",
        timestamp_field=TIMESTAMP_FIELD,
    ),
)
item_popularity_push = PushSource(
    name="item_popularity_push",
    batch_source=FileSource(
        name="item_popularity_batch",
        path="data/item_popularity.parquet",
        timestamp_field=TIMESTAMP_FIELD,
    ),
)

# ttl=0: the values are lifetime aggregates, they never go stale by age.
user_activity = FeatureView(
    name=USER_VIEW,
    entities=[user],
    ttl=timedelta(0),
    online=True,
    source=user_activity_push,
    schema=[
        Field(name="views", dtype=Int64, description="lifetime count of applied view events"),
        Field(name="add_to_carts", dtype=Int64, description="lifetime count of applied add_to_cart events"),
        Field(name="purchases", dtype=Int64, description="lifetime count of applied purchase events"),
        Field(name="last_event_ts", dtype=Int64, description="epoch ms of the newest applied event"),
        Field(
            name="recent_items",
            dtype=Array(String),
            description="50 most recently applied distinct item ids, newest first",
        ),
        Field(
            name="purchased_items",
            dtype=Array(String),
            description="100 most recently purchased distinct item ids, newest first",
        ),
        Field(
            name="top_categories",
            dtype=Array(String),
            description="up to 16 categories with the highest weighted event count, highest first",
        ),
        Field(
            name="top_category_weights",
            dtype=Array(Int64),
            description="weighted event counts of top_categories (view 1, add_to_cart 3, purchase 5)",
        ),
    ],
    description="What a user did, updated by the stream consumer",
)

item_popularity = FeatureView(
    name=ITEM_VIEW,
    entities=[item],
    ttl=timedelta(0),
    online=True,
    source=item_popularity_push,
    schema=[
        Field(name="views", dtype=Int64, description="lifetime count of applied view events"),
        Field(name="add_to_carts", dtype=Int64, description="lifetime count of applied add_to_cart events"),
        Field(name="purchases", dtype=Int64, description="lifetime count of applied purchase events"),
        Field(
            name="trending",
            dtype=Float32,
            description="time-decayed weighted event count as of last_event_ts (exponential half-life)",
        ),
        Field(name="last_event_ts", dtype=Int64, description="epoch ms of the newest applied event"),
        Field(name="category", dtype=String, description="category of the item, last one seen"),
        Field(name="price", dtype=Float32, description="unit price of the item, last one seen"),
    ],
    description="How popular an item is, updated by the stream consumer",
)

ENTITIES = [user, item]
FEATURE_VIEWS = [user_activity, item_popularity]
PUSH_SOURCES = {USER_VIEW: user_activity_push.name, ITEM_VIEW: item_popularity_push.name}
