"""The stream consumer: Kafka ``user-events`` -> exactly-once feature updates in the Feast/Redis online store.

``consumer.py`` runs the loop over its layers: ``kafka_side.py`` (the Kafka client: polls, group
membership, rebalances), ``pipeline.py`` (a batch from validation to its write, dead letters),
``fence.py`` (event-log ownership and rolls, the lost-writes check) and ``state.py`` (what they
share); ``keys.py`` names the Redis keys, ``deadletter.py`` sends dead letters and holds
partitions, ``aggregate.py`` folds a batch of events into per-entity deltas,
``eventlog.py`` keeps the Parquet event log for retraining, ``metrics.py`` the Prometheus metrics,
``config.py`` the typed configuration and ``cli.py`` the ``recstack stream`` subcommand.
"""
