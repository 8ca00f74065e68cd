"""Metrics helpers shared by the services.

Importing Feast sets ``PROMETHEUS_MULTIPROC_DIR`` for the whole process (its feature server
forks workers), which switches every metric created afterwards to values in shared mmap files:
slower on the hot path, and shared between registries of one process. Our services keep one
process's own metrics, so they create them inside :func:`in_process_values`, whatever the
import order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import values as _values


@contextlib.contextmanager
def in_process_values() -> Iterator[None]:
    """Metrics created inside this block keep their values in process memory."""
    saved = _values.ValueClass
    _values.ValueClass = _values.MutexValue
    try:
        yield
    finally:
        _values.ValueClass = saved
