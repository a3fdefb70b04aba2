"""``paused()``: Python's cyclic garbage collector off while a generator builds a large plan.

A plan at D=64, N=1024 is hundreds of thousands of small tuples, none of them in a cycle; each
allocation burst otherwise triggers collections that walk every tracked object, which costs a
schedule like ``bitpipe-zb`` more than its own work. Reference counting still frees everything.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Collector off inside, back to its previous state after (nesting is safe)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
