"""Experiments: which model version serves which user (:mod:`.assign`), how the arms compare
(:mod:`.stats`) and a simulated storefront whose shoppers follow a hidden preference (:mod:`.simulate`).

Kept import-free on purpose: the ranking server imports :mod:`.assign` on its hot path and must not
pay for numpy or pandas here.
"""
