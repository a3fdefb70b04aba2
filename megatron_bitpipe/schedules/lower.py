"""Compute-only schedule -> executable schedule with SEND/RECV and REDUCE_GRAD actions.

Every rank's program is one global order cut into ranks, so that no order of launches can hang
on NCCL (``runtime.nccl_rules`` replays it): the compute actions are timed with unit costs
(``simulate.timeline``: F=1, B=2, I=W=1), and each rank runs its own actions sorted by time.

  * a message's SEND and its RECV stand at the same point of that order, the end of the action
    that produces it: the SEND follows its producer (F -> SEND_F, B/I -> SEND_B), after only the
    receives of messages that lower ranks send at that moment, and the peer posts the receive
    there, before its consumer. The V turn and other same-rank hand-overs get no message.
    Receives from one peer come in the order that peer sends (NCCL ignores tags);
  * REDUCE_GRAD(stage) stands, on both replicas (two pipelines) or on its rank (data parallel
    only), where the later of the two replicas has run the stage's last backward (eager sync).

At one point of time come the messages (by sender rank), then the syncs (by stage position),
then the compute that starts there; both ends of a message or a sync give it the same place.

Why one order: once every operation before a message (or sync) in that order has completed, its
two ends can start and match, whatever is queued behind them. So no rank can hang: with
``CUDA_DEVICE_MAX_CONNECTIONS=1``, where every stream of a GPU shares one FIFO queue; with
communicators created at their first call; with a device-wide sync anywhere (the lowest one
waits only for operations before it, which all complete).
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from megatron_bitpipe.schedules.errors import ScheduleError
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule
from megatron_bitpipe.schedules.placement import Placement
from megatron_bitpipe.schedules.simulate import Costs, timeline

_MESSAGE, _SYNC, _COMPUTE = range(3)
"""What runs first at one point of time (module docstring)."""


def lower(schedule: Schedule, *, grad_sync: bool | None = None) -> Schedule:
    """Add communication (and, for two pipelines or when asked, replica syncs) to ``schedule``."""
    if schedule.is_lowered:
        raise ScheduleError(f"{schedule.name}: schedule is already lowered")
    if grad_sync is None:
        grad_sync = schedule.placement.num_pipelines == 2
    placement = schedule.placement
    stage_rank = placement.stage_ranks
    stages = range(placement.num_stages)
    send_to = {
        Kind.F: ([placement.next_stage(stage) for stage in stages], Kind.SEND_F, Kind.RECV_F),
        Kind.B: ([placement.prev_stage(stage) for stage in stages], Kind.SEND_B, Kind.RECV_B),
    }
    send_to[Kind.I] = send_to[Kind.B]
    width = max(placement.num_ranks, placement.stages_per_pipeline) + 1

    def place(time: float, tier: int, tie: int) -> int:
        """One integer per point of the order (unit costs make every time an integer)."""
        assert time.is_integer(), f"unit costs give integer times, got {time}"
        return (int(time) * 3 + tier) * width + tie

    keyed: list[list[tuple[int, Action]]] = [[] for _ in schedule.programs]
    last_backward: dict[tuple[int, int], float] = {}
    for rank, action, start, end in timeline(schedule, Costs()):
        stage, kind, microbatch = action
        keyed[rank].append((place(start, _COMPUTE, 0), action))
        if kind is Kind.B or kind is Kind.W:
            last_backward[(rank, stage)] = end
        if kind is Kind.W:
            continue
        targets, send, receive = send_to[kind]
        target = targets[stage]
        if target is not None and stage_rank[target] != rank:
            key = place(end, _MESSAGE, rank)
            keyed[rank].append((key, Action(stage, send, microbatch)))
            keyed[stage_rank[target]].append((key, Action(target, receive, microbatch)))
    if grad_sync:
        for (rank, stage), end in last_backward.items():
            position = placement.position(stage)
            partner = _replica(placement, rank)
            partner_end = last_backward[(partner, _stage_at(placement, partner, position))]
            key = place(max(end, partner_end), _SYNC, position)
            keyed[rank].append((key, Action(stage, Kind.REDUCE_GRAD)))
    programs = tuple(tuple(action for _, action in sorted(items)) for items in keyed)
    return schedule.with_programs(programs)


def _replica(placement: Placement, rank: int) -> int:
    """The rank holding the other replica of ``rank``'s stages (itself with one pipeline)."""
    return placement.num_ranks - 1 - rank if placement.num_pipelines == 2 else rank


def _stage_at(placement: Placement, rank: int, position: int) -> int:
    """The stage of ``rank`` at ``position`` of its pipeline."""
    return next(stage for stage in placement.rank_stages[rank] if placement.position(stage) == position)


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
