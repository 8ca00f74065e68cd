"""The Feast feature repository of recstack and the modules that know its Redis layout.

* ``definitions.py``: entities, push sources and feature views (what ``feast apply`` executes);
* ``store.py``: ``open_store(redis_url)``, a ``feast.FeatureStore`` on any Redis database;
* ``spec.py``: the feature constants training and serving share; ``values.py``: the feature
  dataclasses and update rules (neither imports Feast);
* ``layout.py``: key names and field encoding; ``reads.py``: fast reads for ranking;
  ``writes.py``: atomic batch merges for the stream consumer (``cluster.py`` on a Redis Cluster),
  with the Lua scripts of ``lua/`` (loaded by ``scripts.py``); ``changes.py``: the item change feed.

Nothing is imported here, so ``import feature_store`` stays cheap (Feast itself takes seconds).
"""
