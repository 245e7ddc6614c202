"""The garbage collector's settings while a run sends."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def objects_so_far_frozen(young: int = 10_000) -> Iterator[None]:
    """While sending, the garbage collector leaves alone the objects that existed before (gc.freeze: the
    ~200,000 of the modules imported to get here, which every full collection walked again) and looks at
    young objects every `young` allocations rather than every 700. Both are put back afterwards, and any
    cycle among the older objects is collected then."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(young, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
