"""The ranker: training data from event logs, the two-path PyTorch model, its int8 form, versioned
artifacts and the inference API the ranking service loads (:mod:`models.artifacts`,
:mod:`models.inference`).

Plain PyTorch and data code: nothing here imports ``services/``, gRPC, Kafka or Redis.
"""
