"""Engines owned by the thread that made them: they may not be freed on any other thread
(regorus aborts the drop), and garbage collection runs on whichever thread allocates. So an object
that uses an engine holds only a key; the engine lives in the making thread's local storage."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

_local = threading.local()
T = TypeVar("T")


def _engines() -> dict[tuple[str, str], Any]:
    engines: dict[tuple[str, str], Any] | None = getattr(_local, "engines", None)
    if engines is None:
        engines = _local.engines = {}
    return engines


def new_owner() -> str:
    return uuid.uuid4().hex


def engine_for(owner: str, version: str, make: Callable[[], T]) -> T:
    """This thread's engine for (`owner`, `version`), made on first use; the owner's engines for other
    versions are dropped (here, on their own thread)."""
    engines = _engines()
    engine = engines.get((owner, version))
    if engine is None:
        for key in [k for k in engines if k[0] == owner]:
            del engines[key]
        engine = engines[(owner, version)] = make()
    made: T = engine
    return made


def drop(owner: str) -> None:
    """Forget the owner's engines held by this thread (call from the thread that used them)."""
    engines = _engines()
    for key in [k for k in engines if k[0] == owner]:
        del engines[key]
