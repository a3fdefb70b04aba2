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
    facts = placement.num_stages * n
    # done[fact]: 1 once the fact's action has ended; forward facts at stage * n + microbatch,
    # input-gradient facts at facts + stage * n + microbatch, and an always-done fact at ``none``
    # for an action without an input. Ends of one step are committed after every rank has moved.
    none = 2 * facts
    done = bytearray(none + 1)
    done[none] = 1
    stages = range(placement.num_stages)
    # the fact index base of each stage's input: its previous stage's forwards, its next stage's
    # input gradients (none: the always-done fact, for every microbatch)
    forward_input = [none if placement.is_first(s) else (s - 1) * n for s in stages]
    grad_input = [none if placement.is_last(s) else facts + (s + 1) * n for s in stages]
    queues = [_compute_queue(program, n, facts, forward_input, grad_input) for program in programs]
    cursor = [0] * len(programs)
    pending: list[deque[tuple[Action, int]]] = [deque() for _ in programs]
    stash = [0] * len(programs)
    orders: list[list[Action]] = [[] for _ in programs]
    left = sum(len(queue) + sum(1 for item in queue if item[1] >= facts) for queue in queues)
    new_action = tuple.__new__
    weight = Kind.W
    lengths = [len(queue) for queue in queues]
    while left:
        ran: list[int] = []
        before = left
        for rank, queue in enumerate(queues):
            position = cursor[rank]
            waiting = pending[rank]
            if position < lengths[rank]:
                action, fact, first, second = queue[position]
                if done[first] and done[second] and (
                    fact >= facts or stash[rank] < cap or not (waiting and done[waiting[0][1]])
                ):
                    cursor[rank] = position + 1
                    orders[rank].append(action)
                    ran.append(fact)
                    if fact < facts:
                        stash[rank] += 1
                    else:
                        waiting.append((new_action(Action, (action[0], weight, action[2])), fact))
                    left -= 1
                    continue
            if waiting and done[waiting[0][1]]:
                orders[rank].append(waiting.popleft()[0])
                stash[rank] -= 1
                left -= 1
        for fact in ran:
            done[fact] = 1
        if left == before:
            stuck = [str(queue[cursor[r]][0]) for r, queue in enumerate(queues) if cursor[r] < len(queue)]
            raise ScheduleError(f"weight-gradient fill cannot progress: waiting at {', '.join(stuck)}")
    return tuple(tuple(order) for order in orders)


def _compute_queue(
    program: Sequence[Action], n: int, facts: int, forward_input: list[int], grad_input: list[int]
) -> list[tuple[Action, int, int, int]]:
    """The program's F and B as (F or I action, fact it makes, fact it needs, fact it needs)."""
    queue = []
    none = 2 * facts
    new_action = tuple.__new__
    forward, backward, input_grad = Kind.F, Kind.B, Kind.I
    for action in program:
        stage, kind, microbatch = action
        index = stage * n + microbatch
        if kind is forward:
            base = forward_input[stage]
            queue.append((action, index, base if base == none else base + microbatch, none))
        elif kind is backward:
            base = grad_input[stage]
            needed = base if base == none else base + microbatch
            queue.append((new_action(Action, (stage, input_grad, microbatch)), facts + index, index, needed))
        else:
            raise ScheduleError(f"weight-gradient fill takes F and B orders, got {action}")
    return queue
