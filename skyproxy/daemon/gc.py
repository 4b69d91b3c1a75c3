"""Garbage-collector tuning for the daemon's own process (`skyproxy serve`), never for embedders."""

from __future__ import annotations

import gc

GC_YOUNG_THRESHOLD = 3500  # allocations before a young collection (CPython's default: 700)


def tune_gc() -> None:
    """Fewer, cheaper cycle collections for a daemon whose requests leave no cycles.

    Everything alive once startup is done (modules, config, servers) lives as long as
    the process: frozen, so no collection walks it again and the longest pause shrinks.
    A request allocates a few hundred objects and frees nearly all of them by reference
    counting, so the young generation may grow larger before it is scanned.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
