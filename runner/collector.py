"""The garbage collector's settings while a run sends."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def objects_so_far_frozen(young: int = 10_000) -> Iterator[None]:
    """While sending, the garbage collector leaves alone the objects that existed before (gc.freeze),
    and looks at young objects every `young` allocations rather than every 700.

    The objects from before are mostly the modules imported to get here (the SDK, polars, pydantic:
    ~200,000 objects), and every full collection would walk them again: the SDK makes enough objects
    for each answer that full collections came every few thousand answers, at ~50-100 ms each. And
    each young collection walks what the requests in flight hold, whatever its period: a longer one
    walks it less often (nearly everything else is freed by reference counting in between). Nothing is
    lost: objects are freed by reference counting as ever, and any cycle among the older objects is
    collected after sending (unfreeze hands them back, and the thresholds are put back)."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(young, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
