"""Replay: publish a data set or an event log to Kafka as storefront events (``recstack replay``)."""
