"""Hand-written schedules the core tests use, independent of the generators."""

from __future__ import annotations

from collections import defaultdict, deque

from megatron_bitpipe.schedules import placement
from megatron_bitpipe.schedules.ir import Action, B, F, Kind, Schedule


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """PipeDream-flush 1F1B on one stage per rank."""
    programs = []
    for rank in range(num_ranks):
        warmup = min(num_ranks - rank - 1, num_microbatches)
        program = [F(rank, microbatch) for microbatch in range(warmup)]
        next_forward = warmup
        for microbatch in range(num_microbatches):
            if next_forward < num_microbatches:
                program.append(F(rank, next_forward))
                next_forward += 1
            program.append(B(rank, microbatch))
        programs.append(tuple(program))
    return Schedule("1f1b", placement.looped(num_ranks), num_microbatches, (0,) * num_microbatches, tuple(programs))


def vshape_gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """All forwards then all backwards on the V placement (rank r: stages r, 2D-1-r)."""
    layout = placement.vshape(num_ranks)
    last = 2 * num_ranks - 1
    programs = []
    for rank in range(num_ranks):
        down, up = rank, last - rank
        forwards = [F(stage, m) for stage in (down, up) for m in range(num_microbatches)]
        backwards = [B(stage, m) for stage in (up, down) for m in range(num_microbatches)]
        programs.append(tuple(forwards + backwards))
    return Schedule("v-gpipe", layout, num_microbatches, (0,) * num_microbatches, tuple(programs))


def bidirectional_gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """Chimera placement, microbatches alternating down/up, all forwards then all backwards."""
    layout = placement.chimera(num_ranks)
    pipelines = tuple(microbatch % 2 for microbatch in range(num_microbatches))
    programs = []
    for rank in range(num_ranks):
        stages = layout.rank_stages[rank]
        forwards = [
            F(stage, m) for m in range(num_microbatches) for stage in stages
            if layout.pipeline_of(stage) == pipelines[m]
        ]
        backwards = [
            B(stage, m) for m in range(num_microbatches) for stage in stages
            if layout.pipeline_of(stage) == pipelines[m]
        ]
        programs.append(tuple(forwards + backwards))
    return Schedule("bi-gpipe", layout, num_microbatches, pipelines, tuple(programs))


def receives_posted_at_use(schedule: Schedule) -> Schedule:
    """``schedule`` with the receive order lowering had before its one global order: each rank
    posts the receives from a peer, in the peer's send order, only just before the compute that
    needs one of them."""
    placement = schedule.placement
    programs = []
    for program in schedule.programs:
        pending: dict[int, deque[Action]] = defaultdict(deque)
        for action in program:
            if action.kind in (Kind.RECV_F, Kind.RECV_B):
                pending[_sender(action, placement)].append(action)
        reordered: list[Action] = []
        for action in program:
            if action.kind in (Kind.RECV_F, Kind.RECV_B):
                continue
            needed = _receive_for(action, placement)
            if needed is not None and needed not in reordered:
                queue = pending[_sender(needed, placement)]
                while needed not in reordered:
                    reordered.append(queue.popleft())
            reordered.append(action)
        programs.append(tuple(reordered))
    return schedule.with_programs(tuple(programs))


def _sender(receive: Action, placement) -> int:
    neighbour = placement.prev_stage if receive.kind is Kind.RECV_F else placement.next_stage
    return placement.rank_of(neighbour(receive.stage))


def _receive_for(action: Action, placement) -> Action | None:
    """The RECV whose message compute ``action`` consumes, if its input comes from another rank."""
    if action.kind is Kind.F:
        receive, source = Kind.RECV_F, placement.prev_stage(action.stage)
    elif action.kind in (Kind.B, Kind.I):
        receive, source = Kind.RECV_B, placement.next_stage(action.stage)
    else:
        return None
    if source is None or placement.rank_of(source) == placement.rank_of(action.stage):
        return None
    return Action(action.stage, receive, action.microbatch)
