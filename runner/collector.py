"""The garbage collector's settings while a run sends."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def objects_so_far_frozen(young: int = 10_000) -> Iterator[None]:
    """While sending, gc.freeze the objects that exist already (every full collection walked the
    imported modules' ~200,000 again) and collect the young every `young` allocations; both undone after."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(young, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
