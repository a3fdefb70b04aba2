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

import bisect
from collections import defaultdict, deque

from megatron_bitpipe.schedules.errors import ScheduleError
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule
from megatron_bitpipe.schedules.placement import Placement
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
    """Roughly: before each compute action that consumes a message, post the receives from that
    peer up to and including it, in the peer's send order (a RECV names the consumer stage);
    after each one that produces a message, add its send. Stage lookups are lists built once
    (the loop sees every action)."""
    placement = schedule.placement
    stages = range(placement.num_stages)
    stage_rank = placement.stage_ranks
    next_stage = [placement.next_stage(stage) for stage in stages]
    prev_stage = [placement.prev_stage(stage) for stage in stages]
    outgoing = messages_of(schedule)
    pending: dict[tuple[int, int], deque[Message]] = {pair: deque(queue) for pair, queue in outgoing.items()}
    programs = []
    for rank, program in enumerate(schedule.programs):
        lowered: list[Action] = []
        posted: set[Message] = set()
        for action in program:
            stage, kind, microbatch = action
            if kind is Kind.F:
                source, target, send = prev_stage[stage], next_stage[stage], Kind.SEND_F
                direction = "F"
            elif kind is Kind.B or kind is Kind.I:
                source, target, send = next_stage[stage], prev_stage[stage], Kind.SEND_B
                direction = "B"
            else:
                lowered.append(action)
                continue
            if source is not None and stage_rank[source] != rank:
                needed = (stage_rank[source], rank, direction, source, microbatch)
                if needed not in posted:
                    queue = pending[(needed[0], rank)]
                    while True:
                        message = queue.popleft()
                        posted.add(message)
                        _, _, sent, producer, sent_microbatch = message
                        forward = sent == "F"
                        consumer = next_stage[producer] if forward else prev_stage[producer]
                        assert consumer is not None
                        receive = Kind.RECV_F if forward else Kind.RECV_B
                        lowered.append(Action(consumer, receive, sent_microbatch))
                        if message == needed:
                            break
            lowered.append(action)
            if target is not None and stage_rank[target] != rank:
                lowered.append(Action(stage, send, microbatch))
        programs.append(tuple(lowered))
    return tuple(programs)


def _add_reduce_grad(
    schedule: Schedule, programs: tuple[tuple[Action, ...], ...]
) -> tuple[tuple[Action, ...], ...]:
    """Insert REDUCE_GRAD after each stage's last backward, in one order shared by replica pairs."""
    placement = schedule.placement
    finished: list[dict[int, int]] = []
    for program in programs:
        last: dict[int, int] = {}
        for position, (stage, kind, _) in enumerate(program):
            if kind is Kind.B or kind is Kind.W:
                after_send = position + 1 < len(program) and program[position + 1].kind is Kind.SEND_B
                last[stage] = position + 1 if after_send else position
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
        taken = 0
        for position in sorted(inserts):
            lowered += program[taken : position + 1]
            lowered += inserts[position]
            taken = position + 1
        lowered += program[taken:]
        result.append(tuple(lowered))
    return tuple(result)


def send_completions(lowered: Schedule) -> tuple[dict[Action, tuple[Action, ...]], ...]:
    """Per rank: RECV action -> the rank's earlier SEND actions known complete once it arrived.

    A send from rank S to rank R is complete once R has posted the matching receive (gloo and
    NCCL both hand the data over then, without S). R's messages to S that R sends after that
    post prove it: the first of them S receives completes the send. Waiting for it there costs
    nothing, while gloo reports a send complete only when waited on; without this, a sent
    activation would stay alive until its backward (its gradient is one such proof) and a sent
    gradient until the end of the step.
    """
    placement = lowered.placement
    stage_rank = placement.stage_ranks
    positions = [{action: index for index, action in enumerate(program)} for program in lowered.programs]
    sends_to: dict[tuple[int, int], list[tuple[int, Action]]] = defaultdict(list)
    for rank, program in enumerate(lowered.programs):
        for index, action in enumerate(program):
            if action.kind is Kind.SEND_F or action.kind is Kind.SEND_B:
                sends_to[(rank, stage_rank[_counterpart(action, placement).stage])].append((index, action))
    result: list[dict[Action, list[Action]]] = [defaultdict(list) for _ in lowered.programs]
    for (sender, receiver), sends in sends_to.items():
        replies = sends_to.get((receiver, sender), [])
        reply_positions = [index for index, _ in replies]
        proofs = [_counterpart(reply, placement) for _, reply in replies]
        proof_positions = [positions[sender][proof] for proof in proofs]
        for sent_at, send in sends:
            posted_at = positions[receiver][_counterpart(send, placement)]
            # replies sent after the receive was posted, and received after the send was made
            first = bisect.bisect_right(reply_positions, posted_at)
            first = max(first, bisect.bisect_right(proof_positions, sent_at))
            if first < len(proofs):
                result[sender][proofs[first]].append(send)
    return tuple({recv: tuple(sends) for recv, sends in per_rank.items()} for per_rank in result)


def _counterpart(send: Action, placement: Placement) -> Action:
    """The RECV action on the peer that receives ``send``'s message."""
    if send.kind is Kind.SEND_F:
        return Action(placement.next_stage(send.stage), Kind.RECV_F, send.microbatch)
    return Action(placement.prev_stage(send.stage), Kind.RECV_B, send.microbatch)
