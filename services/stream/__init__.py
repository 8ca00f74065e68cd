"""The stream consumer: Kafka ``user-events`` -> exactly-once feature updates in the Feast/Redis online store.

``consumer.py`` runs the loop, ``aggregate.py`` folds a batch of events into per-entity deltas,
``eventlog.py`` keeps the Parquet event log for retraining, ``metrics.py`` the Prometheus metrics,
``config.py`` the typed configuration and ``cli.py`` the ``recstack stream`` subcommand.
"""
