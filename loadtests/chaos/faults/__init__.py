"""The faults ``recstack chaos`` knows: each one a :class:`Fault` subclass, its spec next to its code,
registered with :func:`register`.

Every module of this package (but ``base``) is imported the first time the registry is read, so
adding a fault means adding a module here (or a class to the module of its family) with::

    @register
    class DiskSlow(Fault):
        spec = FaultSpec("disk-slow", "what happens", "what is checked", hold_s=5.0)
        order = 120  # its place in the run
        needs = ("disk",)

        def inject(self) -> None: ...  # inject, hold, heal
        def check(self, record) -> None: ...  # optional: its own checks after the window

docs/RELIABILITY.md ("Adding a fault") says more.
"""

from __future__ import annotations

import importlib
import pkgutil

from loadtests.chaos.faults.base import NEEDS, Fault, FaultSpec

_REGISTRY: dict[str, type[Fault]] = {}
_loaded = False


def register(cls: type[Fault]) -> type[Fault]:
    """Class decorator: add ``cls`` to the registry (its spec's name must be new, its order too)."""
    spec = getattr(cls, "spec", None)
    if not isinstance(spec, FaultSpec):
        raise TypeError(f"{cls.__name__}: a fault needs a FaultSpec as its `spec`")
    if not isinstance(getattr(cls, "order", None), int):
        raise TypeError(f"{cls.__name__} ({spec.name}): a fault needs an int `order`")
    if cls.inject is Fault.inject:
        raise TypeError(f"{cls.__name__} ({spec.name}): a fault needs an `inject` method")
    unknown = [n for n in cls.needs if n not in NEEDS]
    if unknown:
        raise TypeError(f"{cls.__name__} ({spec.name}): unknown needs {unknown}; known: {', '.join(NEEDS)}")
    other = _REGISTRY.get(spec.name)
    if other is not None and other is not cls:
        raise ValueError(f"fault {spec.name} registered twice: {other.__qualname__} and {cls.__qualname__}")
    clash = [f.spec.name for f in _REGISTRY.values() if f.order == cls.order and f is not cls]
    if clash:
        raise ValueError(f"fault {spec.name}: order {cls.order} is already {clash[0]}'s")
    _REGISTRY[spec.name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    _loaded = True


def registered() -> tuple[type[Fault], ...]:
    """Every registered fault, in the order the run injects them."""
    _load()
    return tuple(sorted(_REGISTRY.values(), key=lambda f: f.order))


def names() -> tuple[str, ...]:
    return tuple(f.spec.name for f in registered())


def get(name: str) -> type[Fault]:
    """The fault called ``name``; an unknown one is a KeyError naming every known fault."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown fault {name!r}; known: {', '.join(names())}") from None


__all__ = ["Fault", "FaultSpec", "get", "names", "register", "registered"]
