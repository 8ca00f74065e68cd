"""Load tests that drive the stack from outside, as a storefront would.

An open-loop gRPC generator for saturation curves and the SLO gate, a bare echo server that
measures the ceiling of a Python gRPC process on this machine, and Locust storefront journeys
for realistic mixes. Nothing here imports ``services/`` or ``models/``.
"""
