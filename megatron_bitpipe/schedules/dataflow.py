"""The one dataflow engine: every rank runs its program in order on ir's dependency rule set.

An action starts once the facts it requires (``ir.requires``) exist, and running it makes the
facts it produces (``ir.produces``). With ``messages`` (lowered programs) a fact made on another
rank exists here only once the SEND that delivers it (``ir.delivers``) has run; sends, receive
posts and syncs never wait. Clients compile the rules once per schedule (``compile_rules``), then
``run``: the validator's dry run reads ``Outcome.blocked``, the simulator times ``Outcome.runs``.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from megatron_bitpipe.schedules.ir import (
    FACT_KINDS,
    Action,
    Fact,
    Kind,
    Schedule,
    delivers,
    produces,
    requires,
)
from megatron_bitpipe.schedules.placement import Placement

Need = tuple[int, int]
"""A required fact, numbered for microbatch 0, and the rank that produces it."""

Rule = tuple[tuple[Need, ...], tuple[int, ...]]
"""What one kind of action on one stage needs and makes, numbered for microbatch 0."""


class Rules(NamedTuple):
    """ir's rule set numbered for one schedule: ``table[kind][stage]`` is that action's Rule.

    Fact ``(what, stage, microbatch)`` is ``microbatch * facts_per_microbatch + stage *
    len(FACT_KINDS) + FACT_KINDS.index(what)``; its delivered copy adds ``delivered_offset``.
    ``table`` is shared by every schedule of the placement: read it, never change it.
    """

    table: dict[Kind, tuple[Rule, ...]]
    facts_per_microbatch: int
    delivered_offset: int
    num_microbatches: int

    @property
    def num_facts(self) -> int:
        return self.num_microbatches * self.facts_per_microbatch


class Blocked(NamedTuple):
    """A rank that could not finish: it waits at ``position`` for the numbered ``fact``."""

    rank: int
    position: int
    fact: int


class Outcome(NamedTuple):
    """What ``run`` saw. ``runs``: ``(rank, start, stop)``, program positions ``start..stop-1``
    of ``rank`` ran in a row, in the order they ran; ``blocked``: stuck ranks, by rank."""

    runs: list[tuple[int, int, int]]
    blocked: list[Blocked]


def compile_rules(schedule: Schedule, *, messages: bool) -> Rules:
    """Number ir's rule set for every kind and stage of ``schedule``; with ``messages`` a fact
    from another rank is needed as delivered by its SEND (lowered programs)."""
    delivered_offset = schedule.placement.num_stages * len(FACT_KINDS)
    facts_per_microbatch = 2 * delivered_offset if messages else delivered_offset
    table = _table(schedule.placement, messages)
    return Rules(table, facts_per_microbatch, delivered_offset, schedule.num_microbatches)


@functools.lru_cache(maxsize=64)
def _table(placement: Placement, messages: bool) -> dict[Kind, tuple[Rule, ...]]:
    """``Rules.table`` (cached: it depends on the placement alone, not the microbatch count)."""
    stage_rank = placement.stage_ranks
    delivered_offset = placement.num_stages * len(FACT_KINDS)

    def number(fact: Fact) -> int:
        what, stage, microbatch = fact
        assert microbatch == 0, "the rule set relates facts of one microbatch"
        return stage * len(FACT_KINDS) + FACT_KINDS.index(what)

    def rule(action: Action) -> Rule:
        if not action.is_compute:
            fact = delivers(action)
            if fact is None or not messages:
                return (), ()
            return (), (delivered_offset + number(fact),)
        rank = stage_rank[action.stage]
        needs = []
        for fact in requires(action, placement):
            producer = stage_rank[fact[1]]
            moved = messages and producer != rank
            needs.append((number(fact) + (delivered_offset if moved else 0), producer))
        return tuple(needs), tuple(number(fact) for fact in produces(action))

    stages = range(placement.num_stages)
    return {kind: tuple(rule(Action(stage, kind, 0)) for stage in stages) for kind in Kind}


def run(programs: Sequence[Sequence[Action]], rules: Rules) -> Outcome:
    """Run all ``programs`` together until every rank finished or none can move.

    A worklist of ranks: a rank runs until an action needs a fact not made yet, and waits there
    until the fact is made. Every rank's actions run in program order.
    """
    table, per_microbatch = rules.table, rules.facts_per_microbatch
    made = bytearray(rules.num_facts)
    waiting: dict[int, list[int]] = {}
    awaited = [-1] * len(programs)
    cursor = [0] * len(programs)
    runs: list[tuple[int, int, int]] = []
    ready = deque(range(len(programs)))
    while ready:
        rank = ready.popleft()
        program = programs[rank]
        start = position = cursor[rank]
        stop = len(program)
        while position < stop:
            stage, kind, microbatch = program[position]
            needs, makes = table[kind][stage]
            for fact, _ in needs:
                fact += microbatch * per_microbatch
                if not made[fact]:
                    break
            else:
                for fact in makes:
                    fact += microbatch * per_microbatch
                    made[fact] = 1
                    if fact in waiting:
                        ready.extend(waiting.pop(fact))
                position += 1
                continue
            # the loop over needs stopped at ``fact``, which is not made yet
            waiting.setdefault(fact, []).append(rank)
            awaited[rank] = fact
            break
        if position > start:
            runs.append((rank, start, position))
        cursor[rank] = position
    blocked = [
        Blocked(rank, cursor[rank], awaited[rank])
        for rank, program in enumerate(programs)
        if cursor[rank] < len(program)
    ]
    return Outcome(runs, blocked)


def ready_order(outcome: Outcome) -> Iterator[tuple[int, int]]:
    """Every ``(rank, position)`` that ran, in the order the engine ran them."""
    for rank, start, stop in outcome.runs:
        for position in range(start, stop):
            yield rank, position


def describe(rules: Rules, fact: int) -> Fact:
    """``(what, stage, microbatch)`` of a numbered fact; a delivered one reads ``message(what)``."""
    microbatch, index = divmod(fact, rules.facts_per_microbatch)
    delivered = index >= rules.delivered_offset
    stage, what = divmod(index - rules.delivered_offset if delivered else index, len(FACT_KINDS))
    name = FACT_KINDS[what]
    return (f"message({name})" if delivered else name, stage, microbatch)
