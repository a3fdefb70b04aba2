"""Compute-only schedule -> executable schedule with SEND/RECV and REDUCE_GRAD actions.

Rules (deterministic, so every rank derives the same message order):
  * a SEND follows its producer at once (F -> SEND_F, B/I -> SEND_B) when the neighbour stage lives
    on another rank; the V turn and other same-rank hand-overs get no message;
  * receives from one peer are posted in the order that peer sends (order-matched p2p: NCCL
    ignores tags), each no later than just before the action that consumes it;
  * REDUCE_GRAD(stage) follows the stage's last backward on its rank (eager sync). With two
    pipelines both replicas issue their syncs in one shared stage order.
"""

from __future__ import annotations

from collections import defaultdict, deque

from megatron_bitpipe.schedules.errors import ScheduleError
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule
from megatron_bitpipe.schedules.validate import Message, messages_of


def lower(schedule: Schedule, *, grad_sync: bool | None = None) -> Schedule:
    """Add communication (and, for two pipelines or when asked, replica syncs) to ``schedule``."""
    if schedule.is_lowered:
        raise ScheduleError(f"{schedule.name}: schedule is already lowered")
    if grad_sync is None:
        grad_sync = schedule.placement.num_pipelines == 2
    programs = _add_comm(schedule)
    if grad_sync:
        programs = _add_reduce_grad(schedule, programs)
    return schedule.with_programs(programs)


def _add_comm(schedule: Schedule) -> tuple[tuple[Action, ...], ...]:
    placement = schedule.placement
    outgoing = messages_of(schedule)
    pending: dict[tuple[int, int], deque[Message]] = {pair: deque(queue) for pair, queue in outgoing.items()}
    programs = []
    for rank, program in enumerate(schedule.programs):
        lowered: list[Action] = []
        posted: set[Message] = set()
        for action in program:
            needed = _incoming(action, rank, schedule)
            if needed is not None and needed not in posted:
                queue = pending[(needed[0], rank)]
                while True:
                    message = queue.popleft()
                    posted.add(message)
                    lowered.append(_receive_action(message, schedule))
                    if message == needed:
                        break
            lowered.append(action)
            outgoing_action = _send_action(action, rank, schedule)
            if outgoing_action is not None:
                lowered.append(outgoing_action)
        programs.append(tuple(lowered))
    del placement
    return tuple(programs)


def _incoming(action: Action, rank: int, schedule: Schedule) -> Message | None:
    """The message ``action`` consumes from another rank, if any."""
    placement = schedule.placement
    microbatch = action.microbatch
    if action.kind is Kind.F:
        source = placement.prev_stage(action.stage)
        direction = "F"
    elif action.kind in (Kind.B, Kind.I):
        source = placement.next_stage(action.stage)
        direction = "B"
    else:
        return None
    if source is None or placement.rank_of(source) == rank:
        return None
    assert microbatch is not None
    return (placement.rank_of(source), rank, direction, source, microbatch)


def _send_action(action: Action, rank: int, schedule: Schedule) -> Action | None:
    placement = schedule.placement
    if action.kind is Kind.F:
        target, kind = placement.next_stage(action.stage), Kind.SEND_F
    elif action.kind in (Kind.B, Kind.I):
        target, kind = placement.prev_stage(action.stage), Kind.SEND_B
    else:
        return None
    if target is None or placement.rank_of(target) == rank:
        return None
    return Action(action.stage, kind, action.microbatch)


def _receive_action(message: Message, schedule: Schedule) -> Action:
    _, _, direction, stage, microbatch = message
    placement = schedule.placement
    if direction == "F":
        consumer = placement.next_stage(stage)
        assert consumer is not None
        return Action(consumer, Kind.RECV_F, microbatch)
    consumer = placement.prev_stage(stage)
    assert consumer is not None
    return Action(consumer, Kind.RECV_B, microbatch)


def _add_reduce_grad(
    schedule: Schedule, programs: tuple[tuple[Action, ...], ...]
) -> tuple[tuple[Action, ...], ...]:
    """Insert REDUCE_GRAD after each stage's last backward, in one order shared by replica pairs."""
    placement = schedule.placement
    finished: list[dict[int, int]] = []
    for program in programs:
        last: dict[int, int] = {}
        for position, action in enumerate(program):
            if action.kind in (Kind.B, Kind.W):
                after_send = position + 1 < len(program) and program[position + 1].kind is Kind.SEND_B
                last[action.stage] = position + 1 if after_send else position
        finished.append(last)
    result = []
    for rank, program in enumerate(programs):
        partner = placement.num_ranks - 1 - rank if placement.num_pipelines == 2 else rank
        partner_done = {placement.position(stage): at for stage, at in finished[partner].items()}
        by_position = {placement.position(stage): stage for stage in finished[rank]}
        order = sorted(
            by_position,
            key=lambda pos: (max(finished[rank][by_position[pos]], partner_done.get(pos, 0)), pos),
        )
        inserts: dict[int, list[Action]] = defaultdict(list)
        cursor = 0
        for position in order:
            stage = by_position[position]
            cursor = max(cursor, finished[rank][stage])
            inserts[cursor].append(Action(stage, Kind.REDUCE_GRAD))
        lowered: list[Action] = []
        for position, action in enumerate(program):
            lowered.append(action)
            lowered.extend(inserts.get(position, ()))
        result.append(tuple(lowered))
    return tuple(result)
