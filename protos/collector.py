"""Python's cyclic garbage collector in the mesh's long-running processes (controller, routers,
expert groups).

By default a full collection scans every tracked object: in a controller at DeepSeek-V3's shape
(torch and Ray imported, a 30k-copy state and table) it took 0.4-1.7 s of wall time on 2 shared
cores, freed nothing, and stopped the event loop in the middle of change steps and Status calls
(measured with `gc.callbacks` during bench/bench_scale.py). The structures the mesh builds are
acyclic: reference counting frees them.
"""

from __future__ import annotations

import contextlib
import gc

__all__ = ["YOUNG_THRESHOLD", "paused_gc", "settle_gc"]

YOUNG_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)


@contextlib.contextmanager
def paused_gc():
    """The collector paused while a large acyclic structure is built (a V3 table's 30k copies:
    collections that free nothing took 85% of its decode). Reference counting still frees."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def settle_gc() -> None:
    """Once a service process has imported and built what it keeps (call at its start): move those
    objects out of every later scan (gc.freeze), and collect young objects every YOUNG_THRESHOLD
    allocations, older generations rarely. Cycles made later are still collected."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 20, 20)
