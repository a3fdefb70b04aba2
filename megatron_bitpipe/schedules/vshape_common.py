"""Pieces the V-shape planners share: constants, action builders and ``_PeriodicProgram``.

See ``vshape`` for the family overview.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat

from megatron_bitpipe.schedules.ir import Action, Kind

SLOTS_PER_MICROBATCH = 6
"""One rank's work for one microbatch at unit cost: F f I i W w."""

DOWN, UP = 0, 1
"""Legs of the V, as indices into ``placement.rank_stages[rank]``."""

FORWARD, INPUT_GRAD = Kind.F, Kind.I
"""Bound once: looking up an enum member costs more than the comparisons in the hot loops."""

State = tuple[int, int]
"""(live activations, pending W) before a slot."""


# --- programs with a repeating middle ------------------------------------------------------------

_new_action = partial(tuple.__new__, Action)
"""``Action(stage, kind, microbatch)`` from one tuple, without the Python-level constructor."""


def _actions(stage: int, kind: Kind, microbatches: range) -> list[Action]:
    """``[Action(stage, kind, m) for m in microbatches]``, built in C."""
    return list(map(_new_action, zip(repeat(stage), repeat(kind), microbatches)))


def _shifted(action: Action, microbatches: int) -> Action:
    """``action`` for the microbatch ``microbatches`` later."""
    stage, kind, microbatch = action
    return _new_action((stage, kind, microbatch + microbatches))


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a few 100k acyclic tuples.

    Each Action holds a Kind (a tracked object), so every tuple stays tracked and the collector
    rescans the growing heap over and over: about a third of the time at D=64, N=1024.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class _PeriodicProgram:
    """One rank's program: ``head``, then ``body`` ``repeats`` times with every microbatch one
    higher each time, then ``tail``.

        head F0 F1, body I0 F2, repeats 3, tail I3  ->  F0 F1 I0 F2 I1 F3 I2 F4 I3
    """

    head: list[Action]
    body: list[Action]
    repeats: int
    tail: list[Action]

    @property
    def body_start(self) -> int:
        return len(self.head)

    @property
    def body_stop(self) -> int:
        return len(self.head) + len(self.body) * self.repeats

    def __len__(self) -> int:
        return self.body_stop + len(self.tail)

    def __getitem__(self, position: int) -> Action:
        if position < self.body_start:
            return self.head[position]
        if position < self.body_stop:
            repeat_index, index = divmod(position - self.body_start, len(self.body))
            return _shifted(self.body[index], repeat_index)
        return self.tail[position - self.body_stop]

    def expand(self) -> tuple[Action, ...]:
        """Every action in order; the repeats are built one body position at a time."""
        columns = [
            _actions(stage, kind, range(first, first + self.repeats))
            for stage, kind, first in self.body
        ]
        middle = chain.from_iterable(zip(*columns))
        return tuple(chain(self.head, middle, self.tail))
