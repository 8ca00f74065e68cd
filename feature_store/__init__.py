"""The Feast feature repository of recstack and the one module that knows its Redis layout.

* ``definitions.py``: entities, push sources and feature views (what ``feast apply`` executes);
* ``store.py``: ``open_store(redis_url)``, a ``feast.FeatureStore`` on any Redis database;
* ``online.py``: fast reads for ranking and atomic batch merges for the stream consumer.

Nothing is imported here, so ``import feature_store`` stays cheap (Feast itself takes seconds).
"""
