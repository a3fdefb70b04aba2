"""Rules every schedule must keep; a broken rule raises ScheduleError naming rank, action and rule.

Checked, in order: placement (each action on the rank that holds its stage, in its microbatch's
pipeline), completeness (F once and B once, or I and W once, for every stage of every microbatch),
local order (no action before one it depends on, on the same rank), messages (after ``lower``:
every send has its receive, in the same order per peer pair), replica syncs (after the last
backward of their stage, in the same order on both replicas), and deadlock freedom (ranks run
their programs in order; sends and receive posts never block; compute waits for its inputs:
``schedules.dataflow`` runs them).
"""

from __future__ import annotations

from collections import defaultdict

from megatron_bitpipe.schedules.dataflow import compile_rules, describe, run
from megatron_bitpipe.schedules.errors import ScheduleError
from megatron_bitpipe.schedules.ir import (
    COMM_KINDS,
    Action,
    Fact,
    Kind,
    Schedule,
    produces,
    requires,
)

Message = tuple[int, int, str, int, int]  # (sender, receiver, "F"|"B", producing stage, microbatch)


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError at the first broken rule; return None for a valid schedule."""
    _check_shape(schedule)
    if not _actions_are_well_formed(schedule):
        _check_placement(schedule)
        _check_completeness(schedule)
        raise ScheduleError(f"{schedule.name}: malformed schedule")  # pragma: no cover - guard
    if schedule.is_lowered:
        _check_messages(schedule)
        _check_replica_syncs(schedule)
    if dry_run(schedule):
        _check_local_order(schedule)
        _check_progress(schedule)


_KIND_CODE = {Kind.F: 0, Kind.B: 1, Kind.I: 2, Kind.W: 3}


def _actions_are_well_formed(schedule: Schedule) -> bool:
    """One fast pass: placement, ranges, no duplicates, every F and backward present exactly once.

    Returns False at the first problem; the detailed checks then find and describe it.
    """
    placement = schedule.placement
    num_microbatches = schedule.num_microbatches
    num_stages = placement.num_stages
    stage_rank = placement.stage_ranks
    stage_pipeline = [placement.pipeline_of(stage) for stage in range(num_stages)]
    microbatch_pipeline = schedule.microbatch_pipeline
    seen = bytearray(num_stages * num_microbatches * 4)
    counts = [0, 0, 0, 0]
    weight_keys = []
    kind_code = _KIND_CODE
    for rank, program in enumerate(schedule.programs):
        for stage, kind, microbatch in program:
            if not 0 <= stage < num_stages:
                return False
            code = kind_code.get(kind)
            if code is None:
                if (kind is Kind.REDUCE_GRAD) != (microbatch is None):
                    return False
                if microbatch is not None and not 0 <= microbatch < num_microbatches:
                    return False
                continue
            if (
                microbatch is None
                or not 0 <= microbatch < num_microbatches
                or stage_rank[stage] != rank
                or stage_pipeline[stage] != microbatch_pipeline[microbatch]
            ):
                return False
            base = (stage * num_microbatches + microbatch) * 4
            if seen[base + code] or (code == 1 and seen[base + 2]) or (code == 2 and seen[base + 1]):
                return False
            seen[base + code] = 1
            counts[code] += 1
            if code == 3:
                weight_keys.append(base)
    visits = num_microbatches * placement.stages_per_pipeline
    if counts[0] != visits or counts[1] + counts[2] != visits or counts[2] != counts[3]:
        return False
    return all(seen[base + 2] for base in weight_keys)


def timeline_excerpt(schedule: Schedule, rank: int, position: int, width: int = 5) -> str:
    """Every rank's actions around ``position``, the offending one marked ``<-- ERROR HERE``."""
    lines = []
    start = max(0, position - width)
    for other_rank, program in enumerate(schedule.programs):
        window = program[start : position + width + 1]
        cells = " ".join(f"{str(action):>6}" for action in window)
        marker = "   <-- ERROR HERE" if other_rank == rank else ""
        lines.append(f"  rank {other_rank:>2} [{start:>4}:] {cells}{marker}")
    if 0 <= rank < len(schedule.programs) and position < len(schedule.programs[rank]):
        pointer = 18 + 7 * (position - start)
        lines.insert(rank + 1, " " * pointer + "^" * 6)
    return "\n".join(lines)


def _fail(schedule: Schedule, rank: int, position: int, rule: str) -> ScheduleError:
    program = schedule.programs[rank] if 0 <= rank < len(schedule.programs) else ()
    action = program[position] if 0 <= position < len(program) else None
    where = f"rank {rank}, action {action} (position {position})" if action else f"rank {rank}"
    return ScheduleError(
        f"{schedule.name}: {where}: {rule}\n{timeline_excerpt(schedule, rank, position)}"
    )


def _check_shape(schedule: Schedule) -> None:
    placement = schedule.placement
    if len(schedule.programs) != placement.num_ranks:
        raise ScheduleError(
            f"{schedule.name}: {len(schedule.programs)} programs for {placement.num_ranks} ranks"
        )
    if len(schedule.microbatch_pipeline) != schedule.num_microbatches:
        raise ScheduleError(f"{schedule.name}: microbatch_pipeline must give one pipeline per microbatch")
    for microbatch, pipeline in enumerate(schedule.microbatch_pipeline):
        if not 0 <= pipeline < placement.num_pipelines:
            raise ScheduleError(
                f"{schedule.name}: microbatch {microbatch} assigned to pipeline {pipeline}, "
                f"placement has {placement.num_pipelines}"
            )


def _check_placement(schedule: Schedule) -> None:
    placement = schedule.placement
    for rank, position, action in schedule.actions():
        if not 0 <= action.stage < placement.num_stages:
            raise _fail(schedule, rank, position, f"stage {action.stage} does not exist")
        if action.kind is Kind.REDUCE_GRAD:
            if action.microbatch is not None:
                raise _fail(schedule, rank, position, "REDUCE_GRAD takes no microbatch")
        elif action.microbatch is None or not 0 <= action.microbatch < schedule.num_microbatches:
            raise _fail(
                schedule, rank, position, f"microbatch must be in 0..{schedule.num_microbatches - 1}"
            )
        elif placement.pipeline_of(action.stage) != schedule.microbatch_pipeline[action.microbatch]:
            raise _fail(
                schedule,
                rank,
                position,
                f"microbatch {action.microbatch} flows through pipeline "
                f"{schedule.microbatch_pipeline[action.microbatch]}, not the one of stage {action.stage}",
            )
        if placement.rank_of(action.stage) != rank:
            raise _fail(
                schedule,
                rank,
                position,
                f"stage {action.stage} lives on rank {placement.rank_of(action.stage)} "
                f"({placement.kind} placement)",
            )


def _check_completeness(schedule: Schedule) -> None:
    seen: dict[Action, tuple[int, int]] = {}
    for rank, position, action in schedule.actions():
        if action.is_compute:
            if action in seen:
                first_rank, first_position = seen[action]
                raise _fail(
                    schedule, rank, position, f"runs twice (first at position {first_position})"
                )
            seen[action] = (rank, position)
    for microbatch in range(schedule.num_microbatches):
        for stage in schedule.stages_of(microbatch):
            rank = schedule.placement.rank_of(stage)
            has = {kind for kind in (Kind.F, Kind.B, Kind.I, Kind.W) if Action(stage, kind, microbatch) in seen}
            missing = None
            if Kind.F not in has:
                missing = f"{stage}F{microbatch}"
            elif Kind.B in has and has & {Kind.I, Kind.W}:
                missing = f"both a full backward and a split one for stage {stage}"
            elif Kind.B not in has and not {Kind.I, Kind.W} <= has:
                missing = f"{stage}B{microbatch} (or {stage}I{microbatch} and {stage}W{microbatch})"
            if missing:
                raise _fail(
                    schedule,
                    rank,
                    len(schedule.programs[rank]),
                    f"microbatch {microbatch} is incomplete: missing {missing}",
                )


def _check_local_order(schedule: Schedule) -> None:
    placement = schedule.placement
    for rank, program in enumerate(schedule.programs):
        produced_at: dict[tuple[str, int, int], int] = {}
        for position, action in enumerate(program):
            if action.is_compute:
                for fact in produces(action):
                    produced_at[fact] = position
        for position, action in enumerate(program):
            if not action.is_compute:
                continue
            for fact in requires(action, placement):
                where = produced_at.get(fact)
                if where is not None and where > position:
                    raise _fail(
                        schedule,
                        rank,
                        position,
                        f"needs {program[where]} (the {fact[0]} of stage {fact[1]}), "
                        f"which this rank runs later, at position {where}",
                    )


def messages_of(schedule: Schedule) -> dict[tuple[int, int], list[Message]]:
    """Cross-rank messages per (sender, receiver), in the sender's compute order.

    Only F, B and I produce messages, so comm and sync actions are skipped as they come; stage
    lookups are lists built once (this runs over every action of a 64 x 1024 schedule).
    """
    placement = schedule.placement
    stages = range(placement.num_stages)
    stage_rank = placement.stage_ranks
    next_stage = [placement.next_stage(stage) for stage in stages]
    prev_stage = [placement.prev_stage(stage) for stage in stages]
    outgoing: dict[tuple[int, int], list[Message]] = defaultdict(list)
    for rank, program in enumerate(schedule.programs):
        for stage, kind, microbatch in program:
            if kind is Kind.F:
                target, direction = next_stage[stage], "F"
            elif kind is Kind.B or kind is Kind.I:
                target, direction = prev_stage[stage], "B"
            else:
                continue
            if target is not None and stage_rank[target] != rank:
                receiver = stage_rank[target]
                outgoing[(rank, receiver)].append((rank, receiver, direction, stage, microbatch))
    return outgoing


def message_of(action: Action, rank: int, schedule: Schedule) -> Message:
    """The message a SEND/RECV action carries, keyed by its producing stage."""
    placement = schedule.placement
    stage, microbatch = action.stage, action.microbatch
    assert microbatch is not None
    if action.kind is Kind.SEND_F:
        peer = placement.next_stage(stage)
        return (rank, -1 if peer is None else placement.rank_of(peer), "F", stage, microbatch)
    if action.kind is Kind.SEND_B:
        peer = placement.prev_stage(stage)
        return (rank, -1 if peer is None else placement.rank_of(peer), "B", stage, microbatch)
    if action.kind is Kind.RECV_F:
        peer = placement.prev_stage(stage)
        sender = -1 if peer is None else placement.rank_of(peer)
        return (sender, rank, "F", -1 if peer is None else peer, microbatch)
    peer = placement.next_stage(stage)
    sender = -1 if peer is None else placement.rank_of(peer)
    return (sender, rank, "B", -1 if peer is None else peer, microbatch)


def _check_messages(schedule: Schedule) -> None:
    expected = messages_of(schedule)
    sent: dict[tuple[int, int], list[tuple[Message, int, int]]] = defaultdict(list)
    received: dict[tuple[int, int], list[tuple[Message, int, int]]] = defaultdict(list)
    for rank, position, action in schedule.actions():
        if action.kind not in COMM_KINDS:
            continue
        message = message_of(action, rank, schedule)
        sender, receiver = message[0], message[1]
        if sender == receiver or -1 in (sender, receiver):
            raise _fail(schedule, rank, position, "no message crosses ranks here (local hand-over or pipeline end)")
        book = sent if action.kind in (Kind.SEND_F, Kind.SEND_B) else received
        book[(sender, receiver)].append((message, rank, position))
    for pair in set(expected) | set(sent) | set(received):
        want = expected.get(pair, [])
        sends = [entry[0] for entry in sent.get(pair, [])]
        receives = [entry[0] for entry in received.get(pair, [])]
        for label, got, entries in (("send", sends, sent), ("receive", receives, received)):
            if sorted(got) != sorted(want):
                rank = pair[0] if label == "send" else pair[1]
                missing = sorted(set(want) - set(got)) or sorted(set(got) - set(want))
                raise _fail(
                    schedule,
                    rank,
                    len(schedule.programs[rank]),
                    f"{label}s from rank {pair[0]} to rank {pair[1]} do not match the compute: "
                    f"wrong or missing {_describe(missing[0])}",
                )
        for index, (send, receive) in enumerate(zip(sends, receives, strict=True)):
            if send != receive:
                _, rank, position = received[pair][index]
                raise _fail(
                    schedule,
                    rank,
                    position,
                    f"message order from rank {pair[0]} differs: message {index} is sent as "
                    f"{_describe(send)} but received as {_describe(receive)} (order-matched p2p)",
                )
    _check_message_placement(schedule)


def _describe(message: Message) -> str:
    _, _, direction, stage, microbatch = message
    what = "activation" if direction == "F" else "gradient"
    return f"{what} of stage {stage}, microbatch {microbatch}"


def _check_message_placement(schedule: Schedule) -> None:
    """A SEND comes after its producer; a RECV comes before its consumer."""
    for rank, program in enumerate(schedule.programs):
        index = {action: position for position, action in enumerate(program)}
        for position, (stage, kind, microbatch) in enumerate(program):
            if kind not in COMM_KINDS:
                continue
            if kind in (Kind.SEND_F, Kind.RECV_F):
                related = Action(stage, Kind.F, microbatch)
            else:
                split = Action(stage, Kind.I, microbatch)
                related = split if split in index else Action(stage, Kind.B, microbatch)
            must_precede = kind in (Kind.SEND_F, Kind.SEND_B)
            where = index.get(related)
            if where is None or (where > position) == must_precede:
                rule = (
                    "comes before the action that produces it"
                    if must_precede
                    else "comes after the action that consumes it"
                )
                raise _fail(schedule, rank, position, f"{kind.value} {rule} ({related})")


def _check_replica_syncs(schedule: Schedule) -> None:
    placement = schedule.placement
    order: dict[int, list[int]] = {}
    for rank, program in enumerate(schedule.programs):
        last_backward: dict[int, int] = {}
        for position, action in enumerate(program):
            if action.kind in (Kind.B, Kind.W):
                last_backward[action.stage] = position
        synced: list[int] = []
        for position, action in enumerate(program):
            if action.kind is not Kind.REDUCE_GRAD:
                continue
            if action.stage in synced:
                raise _fail(schedule, rank, position, "the stage is synced twice")
            if last_backward.get(action.stage, -1) > position:
                raise _fail(
                    schedule,
                    rank,
                    position,
                    f"sync before the stage's last backward (position {last_backward[action.stage]})",
                )
            synced.append(action.stage)
        order[rank] = [placement.position(stage) for stage in synced]
    if placement.num_pipelines == 2:
        for rank in range(placement.num_ranks):
            partner = placement.num_ranks - 1 - rank
            if order[rank] != order[partner]:
                raise _fail(
                    schedule,
                    rank,
                    len(schedule.programs[rank]),
                    f"replica syncs run in stage order {order[rank]} here but {order[partner]} on "
                    f"the replica rank {partner}; collectives must match",
                )


def _check_progress(schedule: Schedule) -> None:
    """Run all programs together; if no rank can move before all finish, report the deadlock."""
    blocked = dry_run(schedule)
    if not blocked:
        return
    details = "; ".join(
        f"rank {rank} waits at {schedule.programs[rank][position]} for {fact[0]} of stage "
        f"{fact[1]} mb {fact[2]}"
        for rank, position, fact in blocked
    )
    rank, position, _ = blocked[0]
    raise _fail(schedule, rank, position, f"deadlock: {details}")


def dry_run(schedule: Schedule) -> list[tuple[int, int, Fact]]:
    """Run every rank in order (``dataflow.run``); return ``(rank, position, awaited fact)`` for
    the blocked ranks, by rank. In a lowered schedule an input from another rank arrives when its
    SEND has run; such a fact reads ``message(activation)`` or ``message(input_grad)``.
    """
    rules = compile_rules(schedule, messages=schedule.is_lowered)
    outcome = run(schedule.programs, rules)
    return [(rank, position, describe(rules, fact)) for rank, position, fact in outcome.blocked]
