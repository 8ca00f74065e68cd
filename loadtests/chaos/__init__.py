"""``recstack chaos``: the whole local stack under steady traffic, faults injected one after another.

Each fault has its own checks (nothing lost or applied twice, dead letters, the ranking error mix,
p99 during and after, recovery time); the results end as a table (``reliability.md``), raw
figures (``results.json``) and a timeline plot. Like the other load tests it drives the stack from
outside, as an operator would: processes, signals, the ``infra/`` scripts.
"""
