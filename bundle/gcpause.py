"""Pause the cyclic garbage collector while building large, acyclic object graphs.

Decoding a 5,000-service evaluation or building its route table allocates hundreds of
thousands of containers at once; each allocation burst triggers generation-0 and
then full collections that rescan everything built so far, which makes building
quadratic in practice (measured: unpickling 60,000 calls takes 1.25 s with the
collector on, 0.2 s with it paused). What these builders create holds no cycles, so
nothing is lost by collecting once afterwards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block; restore it only if it was enabled."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
