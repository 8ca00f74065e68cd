"""The ranking service: gRPC ``Rank``/``Recommend`` over micro-batched feature reads and the served model."""
