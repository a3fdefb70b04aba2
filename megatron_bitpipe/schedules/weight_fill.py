"""Split every backward of an F/B order into I and W, and let the Ws fill the bubbles.

``fill(placement, programs, num_microbatches, cap)`` keeps each rank's F and I in the order of the
given programs (B becomes I) and times them with F=I=W=1, step by step, every rank at once. A W
becomes pending when its I has run; a rank whose next F or I cannot run yet (its input has not
arrived) runs its oldest pending W instead of idling; before an F that would stash more than
``cap`` chunk activations (an activation lives from its F to its W) it runs a pending W first.
Pending Ws run, in order, once the rank's Fs and Is are done. Pure: the same input gives the
same order.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from megatron_bitpipe.schedules.errors import ScheduleError
from megatron_bitpipe.schedules.ir import Action, Kind
from megatron_bitpipe.schedules.placement import Placement

def split(program: Sequence[Action]) -> tuple[Action, ...]:
    """``program`` with every B replaced by its I followed at once by its W."""
    result: list[Action] = []
    for action in program:
        if action.kind is Kind.B:
            result += [action._replace(kind=Kind.I), action._replace(kind=Kind.W)]
        else:
            result.append(action)
    return tuple(result)


def fill(
    placement: Placement, programs: Sequence[Sequence[Action]], num_microbatches: int, cap: int
) -> tuple[tuple[Action, ...], ...]:
    """The F/B ``programs`` split into F, I and W and reordered as the module docstring says."""
    n = num_microbatches
    stages = range(placement.num_stages)
    previous = [placement.prev_stage(stage) for stage in stages]
    following = [placement.next_stage(stage) for stage in stages]
    forward_end = [-1] * (placement.num_stages * n)
    input_end = [-1] * (placement.num_stages * n)
    # per rank: its Fs and Is in order as (action, index, first input, second input) with inputs
    # as (end list, index) pairs; -1 marks no input
    queues = [_compute_queue(program, n, previous, following, forward_end, input_end) for program in programs]
    cursor = [0] * len(programs)
    pending: list[deque[Action]] = [deque() for _ in programs]
    stash = [0] * len(programs)
    orders: list[list[Action]] = [[] for _ in programs]
    left = sum(len(queue) for queue in queues) * 2 - sum(1 for q in queues for item in q if item[0].kind is Kind.F)
    now = 0
    while left:
        ran: list[tuple[list[int], int]] = []
        before = left
        for rank, queue in enumerate(queues):
            position = cursor[rank]
            waiting = pending[rank]
            w_ready = bool(waiting) and 0 <= input_end[waiting[0].stage * n + waiting[0].microbatch] <= now
            if position < len(queue):
                action, index, (ends_a, a), (ends_b, b) = queue[position]
                ready = (a < 0 or 0 <= ends_a[a] <= now) and (b < 0 or 0 <= ends_b[b] <= now)
                if ready and not (action.kind is Kind.F and stash[rank] >= cap and w_ready):
                    cursor[rank] = position + 1
                    orders[rank].append(action)
                    if action.kind is Kind.F:
                        stash[rank] += 1
                        ran.append((forward_end, index))
                    else:
                        waiting.append(action._replace(kind=Kind.W))
                        ran.append((input_end, index))
                    left -= 1
                    continue
            if w_ready:
                orders[rank].append(waiting.popleft())
                stash[rank] -= 1
                left -= 1
        now += 1
        for ends, index in ran:
            ends[index] = now
        if left == before:
            stuck = [str(queue[cursor[r]][0]) for r, queue in enumerate(queues) if cursor[r] < len(queue)]
            raise ScheduleError(f"weight-gradient fill cannot progress: waiting at {', '.join(stuck)}")
    return tuple(tuple(order) for order in orders)


def _compute_queue(
    program: Sequence[Action],
    n: int,
    previous: list[int | None],
    following: list[int | None],
    forward_end: list[int],
    input_end: list[int],
) -> list[tuple[Action, int, tuple[list[int], int], tuple[list[int], int]]]:
    """The program's F and B as (F or I action, fact index, input, input)."""
    queue = []
    for action in program:
        stage, kind, microbatch = action
        index = stage * n + microbatch
        if kind is Kind.F:
            before = previous[stage]
            queue.append((action, index, (forward_end, -1 if before is None else before * n + microbatch), (input_end, -1)))
        elif kind is Kind.B:
            after = following[stage]
            queue.append(
                (action._replace(kind=Kind.I), index, (forward_end, index), (input_end, -1 if after is None else after * n + microbatch))
            )
        else:
            raise ScheduleError(f"weight-gradient fill takes F and B orders, got {action}")
    return queue
