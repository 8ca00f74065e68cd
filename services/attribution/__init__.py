"""The attribution consumer group: ``rank-impressions`` joined with ``user-events`` into per-arm
online metrics in Redis, exactly once (docs/EXPERIMENTS.md, "Attribution" and "Online metrics")."""
