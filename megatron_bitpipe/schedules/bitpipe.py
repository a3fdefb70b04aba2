"""BitPipe (arXiv 2410.19367): two mirrored V pipelines, 4 chunks per rank (``placement.bitpipe``).

Microbatch m goes down iff ``m % D < D/2``: blocks of D/2 alternate down/up. Two schedules:

``bitpipe-official``: the op order of wuhouming/BitPipe's ``bitpipe_schedule.py``
(``get_microbatch_idx`` / ``get_bkmicrobatch_idx``): units of D microbatches, directly concatenated. With F=1, B=2 per chunk its idle
time per rank is (N/D + 1)(D - 2): it grows by D-2 with every unit.

``bitpipe``: the faster of the official order and a steady-state order whose idle time does not
grow with N. In the steady state every rank works in lockstep 3-unit cells, one forward then one
backward per cell::

    down microbatch j, stage k (0..2D-1):  F in cell 4j + k,      B in cell 4j + 4D-2-k
    up microbatch j, position k:           F in cell 4j + d + k,  B in cell 4j + d + 4D-2-k
                                           d = (D + 2) % 4

A rank's four forwards fall in four distinct cells mod 4, and so do its four backwards, so once
the pipeline is full every cell of every rank holds exactly one F and one B: no bubble. A chunk
activation lives from its forward's cell to its backward's, which keeps exactly 2D of them per
rank; a microbatch spends 4D cells in flight, so D microbatches per direction are in flight
(the official order keeps D/2). Warm-up and cool-down cost a fixed idle time instead of the
official order's D-2 per unit (F=1, B=2): 4D-4 when D % 4 == 0, 4D-8 otherwise (0 for D=2).

Reordered ends: from N >= 4D on (D >= 4), ``bitpipe`` replaces the steady state's warm-up and
cool-down by list scheduling. The first 6D actions of every rank are re-timed with F=1, B=2
(time order; whenever a rank is free it runs the first of its next D/2+2 unplaced actions whose
inputs are there, skipping a forward that would stash more than 2D chunk activations); then the
last 6D actions the same way, backwards in time. The idle time drops from 4D-4 to 6, 15, 34 for
D = 4, 8, 16 and stays flat in N; the stash stays <= 2D. The ends do not depend on N once
N >= 4D, so they are computed once per D at N0 = 4D and spliced around the steady middle; their
idle time, measured there by simulation, is cached with them.

``bitpipe`` takes the reordered steady state where its idle beats the official one (ties: the
official order), for N < 4D the steady state where its closed form does, and in both cases only
if ``max_inflight`` (microbatches in flight per direction, default D) allows D; otherwise it
runs the official order. Every form is checked against the simulator in tests, so the choice
costs at most one reorder per D at plan time and is never slower with F=1, B=2.

``max_stash`` (D..3D chunk activations per rank, excludes ``max_inflight``; default: all of the
above, 2D) is the memory/time knob: ``capped_programs`` takes the least idle (F=1, B=2) order
whose peak stash fits, among today's order (cap >= 2D), the reordered ends re-timed under caps
above 2D (N >= 4D) and the stretched ideal-timeline orders of ``Stretch``. Above 2D the idle
drops (6 -> 4, 15 -> 10, 34 -> 25 for D = 4, 8, 16 at N = 4D); below 2D the peak drops to the
cap and the idle rises, with a bubble per microbatch pair that grows with N.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from megatron_bitpipe.schedules.errors import ScheduleConfigError
from megatron_bitpipe.schedules.flags import BARE
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule
from megatron_bitpipe.schedules.placement import bitpipe as bitpipe_placement
from megatron_bitpipe.schedules.registry import ScheduleSpec, register

DOWN, UP = 0, 1
Chunk = tuple[int, int]  # (pipeline, half): half 0 = first D stages of the pipeline, 1 = last D


def check_replica_pairs(name: str, num_ranks: int, num_microbatches: int) -> None:
    """The rules every two-pipeline schedule shares: D even, N a multiple of D."""
    if num_ranks < 2 or num_ranks % 2:
        raise ScheduleConfigError(
            name,
            "pp",
            num_ranks,
            "must be even and >= 2: the two pipelines pair rank r with rank D-1-r, which hold "
            "the same stages",
        )
    if num_microbatches % num_ranks:
        raise ScheduleConfigError(
            name,
            "microbatches",
            num_microbatches,
            "must be a multiple of {pp}: microbatches go down and up in alternating blocks of D/2",
            pp=num_ranks,
        )


def check(num_ranks: int, num_microbatches: int, **options: object) -> None:
    """Raise ScheduleConfigError unless D is even and N a multiple of D."""
    check_replica_pairs("bitpipe", num_ranks, num_microbatches)


def check_official(num_ranks: int, num_microbatches: int, **options: object) -> None:
    """``check``, with the errors labelled bitpipe-official."""
    check_replica_pairs("bitpipe-official", num_ranks, num_microbatches)


def check_inflight(
    num_ranks: int,
    num_microbatches: int,
    max_inflight: int | None = None,
    max_stash: int | None = None,
) -> None:
    """``check`` plus: ``max_inflight`` must leave room for one official unit (D/2), and
    ``check_stash``; the two knobs exclude each other."""
    check(num_ranks, num_microbatches)
    if max_inflight is not None and max_inflight < num_ranks // 2:
        raise ScheduleConfigError(
            "bitpipe",
            "max_inflight",
            max_inflight,
            f"must be >= D/2 = {num_ranks // 2}: every BitPipe order keeps a block of D/2 "
            "microbatches per direction in flight",
        )
    check_stash("bitpipe", num_ranks, max_stash)
    if max_inflight is not None and max_stash is not None:
        raise ScheduleConfigError(
            "bitpipe",
            "max_stash",
            BARE,
            "and {max_inflight} exclude each other: {max_stash} picks the order itself; give one "
            "of them",
        )


def check_stash(name: str, num_ranks: int, max_stash: int | None) -> None:
    """``max_stash``, if given, must lie in [D, 3D] chunk activations per rank."""
    if max_stash is not None and not num_ranks <= max_stash <= 3 * num_ranks:
        raise ScheduleConfigError(
            name,
            "max_stash",
            max_stash,
            f"must be between D = {num_ranks} and 3D = {3 * num_ranks}: chunk activations "
            "stashed per rank (default: 2D as today)",
        )


def microbatch_pipelines(num_ranks: int, num_microbatches: int) -> tuple[int, ...]:
    """Blocks of D/2 alternating down/up: microbatch m goes down iff ``m % D < D/2``."""
    half = num_ranks // 2
    return tuple(DOWN if m % num_ranks < half else UP for m in range(num_microbatches))


def chunk_stage(num_ranks: int, rank: int, chunk: Chunk) -> int:
    """Global stage of ``(pipeline, half)`` on ``rank`` (``placement.bitpipe``'s chunk table)."""
    pipeline, half = chunk
    mirrored = rank if pipeline == DOWN else num_ranks - 1 - rank
    position = mirrored if half == 0 else 2 * num_ranks - 1 - mirrored
    return pipeline * 2 * num_ranks + position


def _microbatches_by_pipeline(
    num_ranks: int, num_microbatches: int
) -> tuple[list[int], list[int]]:
    """The microbatches of each pipeline, in the order they enter it."""
    pipelines = microbatch_pipelines(num_ranks, num_microbatches)
    down = [m for m, pipeline in enumerate(pipelines) if pipeline == DOWN]
    up = [m for m, pipeline in enumerate(pipelines) if pipeline == UP]
    return down, up


def warmup_forwards(num_ranks: int, rank: int) -> int:
    """Forwards before the first backward in the official order: 3D/2 + min(r, D-1-r)."""
    return 3 * num_ranks // 2 + min(rank, num_ranks - 1 - rank)


def official_idle(num_ranks: int, num_microbatches: int) -> int:
    """Idle time per rank of the official order with F=1, B=2 per chunk: (N/D + 1)(D - 2)."""
    return (num_microbatches // num_ranks + 1) * (num_ranks - 2)


def steady_idle(num_ranks: int) -> int:
    """Idle time per rank of the steady-state order with F=1, B=2 per chunk, for any N."""
    if num_ranks == 2:
        return 0
    return 4 * num_ranks - (4 if num_ranks % 4 == 0 else 8)


# --- the official order --------------------------------------------------------------------


def _unit_patterns(num_ranks: int, rank: int) -> tuple[list[Chunk], list[Chunk]]:
    """One unit's forward and backward chunk order on ``rank`` (the official code's
    ``get_microbatch_idx`` and ``get_bkmicrobatch_idx``)."""
    half = num_ranks // 2
    own = DOWN if rank < half else UP
    other = 1 - own
    edge = half - rank if rank < half else rank - half + 1
    middle = half - edge
    forward = (
        [(own, 0)] * edge
        + [(other, 0), (own, 0)] * middle
        + [(other, 0), (other, 1)] * edge
        + [(own, 1), (other, 1)] * middle
        + [(own, 1)] * edge
    )
    backward = (
        [(own, 1)] * edge
        + [(other, 1), (own, 1)] * middle
        + [(other, 1), (other, 0)] * edge
        + [(own, 0), (other, 0)] * middle
        + [(own, 0)] * edge
    )
    return forward, backward


def _official_streams(
    num_ranks: int, rank: int, microbatches: tuple[list[int], list[int]]
) -> tuple[list[Action], list[Action]]:
    """Every forward and every backward of ``rank``, each in the official order."""
    streams = []
    for kind, pattern in zip((Kind.F, Kind.B), _unit_patterns(num_ranks, rank), strict=True):
        stages = {chunk: chunk_stage(num_ranks, rank, chunk) for chunk in set(pattern)}
        upcoming = {chunk: iter(microbatches[chunk[0]]) for chunk in stages}
        units = len(microbatches[DOWN]) * 2 // num_ranks
        order = pattern * units
        new = tuple.__new__  # Action(...) without its Python-level constructor: 262k calls at D=64
        streams.append([new(Action, (stages[chunk], kind, next(upcoming[chunk]))) for chunk in order])
    return streams[0], streams[1]


def _official_program(
    num_ranks: int, rank: int, microbatches: tuple[list[int], list[int]]
) -> tuple[Action, ...]:
    forwards, backwards = _official_streams(num_ranks, rank, microbatches)
    units = len(forwards) // (2 * num_ranks)
    warmup = warmup_forwards(num_ranks, rank)
    pairs = 2 * num_ranks - warmup
    # warm-up: W x F
    order = "F" * warmup
    # junction between units: u x (F B), (W-u+1) x B, (u-1) x (F B), (W-u+1) x F
    drain = warmup - pairs + 1
    junction = "FB" * pairs + "B" * drain + "FB" * (pairs - 1) + "F" * drain
    order += junction * (units - 1)
    # last unit: u x (F B); cool-down: the remaining B
    order += "FB" * pairs
    order += "B" * (len(backwards) - order.count("B"))
    streams = {"F": iter(forwards), "B": iter(backwards)}
    return tuple(next(streams[kind]) for kind in order)


def official_programs(num_ranks: int, num_microbatches: int) -> tuple[tuple[Action, ...], ...]:
    """Every rank's op order exactly as wuhouming/BitPipe generates it."""
    microbatches = _microbatches_by_pipeline(num_ranks, num_microbatches)
    return tuple(_official_program(num_ranks, rank, microbatches) for rank in range(num_ranks))


# --- the steady-state order ----------------------------------------------------------------


def _cell_streams(num_ranks: int, rank: int, kind: Kind) -> list[tuple[int, int, int]]:
    """``(pipeline, stage, cell of its first microbatch)`` of the rank's four forwards or
    backwards (the module docstring's cell table)."""
    offset = (num_ranks + 2) % 4
    streams = []
    for pipeline in (DOWN, UP):
        for half in (0, 1):
            stage = chunk_stage(num_ranks, rank, (pipeline, half))
            position = stage % (2 * num_ranks)
            first = position if kind is Kind.F else 4 * num_ranks - 2 - position
            streams.append((pipeline, stage, first + offset * pipeline))
    return streams


def _steady_program(
    num_ranks: int, rank: int, microbatches: tuple[list[int], list[int]]
) -> tuple[Action, ...]:
    per_pipeline = len(microbatches[DOWN])
    cells = 4 * per_pipeline + 4 * num_ranks
    # slot 2c holds the forward of cell c, slot 2c+1 its backward
    slots: list[Action | None] = [None] * (2 * cells)
    for kind, within in ((Kind.F, 0), (Kind.B, 1)):
        for pipeline, stage, first in _cell_streams(num_ranks, rank, kind):
            start = 2 * first + within
            slots[start : start + 8 * per_pipeline : 8] = [
                Action(stage, kind, microbatch) for microbatch in microbatches[pipeline]
            ]
    return tuple(filter(None, slots))


def steady_programs(num_ranks: int, num_microbatches: int) -> tuple[tuple[Action, ...], ...]:
    """Every rank's order in the lockstep cell schedule of the module docstring."""
    microbatches = _microbatches_by_pipeline(num_ranks, num_microbatches)
    return tuple(_steady_program(num_ranks, rank, microbatches) for rank in range(num_ranks))


# --- the reordered warm-up and cool-down ----------------------------------------------------
# The passes work on integers: action ``(stage, kind, microbatch)`` is
# ``(microbatch * 4D + stage) * 2 + (0 for F, 1 for B)``, so ``op +- 2`` is the same kind one
# stage later / earlier in the microbatch's pipeline and ``op + 1`` is the B of forward ``op``.

REORDER_FROM_UNITS = 4
"""The ends are reordered from N = 4D on and computed once at N0 = 4D."""


def reorder_window(num_ranks: int) -> int:
    """Actions re-timed at each end of every rank's program: 6D."""
    return 6 * num_ranks


def _encode(num_ranks: int, program: tuple[Action, ...]) -> list[int]:
    """A compute-only program of F and B as integers (the comment above)."""
    num_stages = 4 * num_ranks
    return [(m * num_stages + stage) * 2 + (kind is Kind.B) for stage, kind, m in program]


def _decode(num_ranks: int, ops: list[int]) -> tuple[Action, ...]:
    """Inverse of ``_encode``."""
    num_stages = 4 * num_ranks
    kinds = (Kind.F, Kind.B)
    return tuple(
        Action((op >> 1) % num_stages, kinds[op & 1], (op >> 1) // num_stages) for op in ops
    )


def _dependencies(
    num_ranks: int, reverse: bool
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Indexed by ``op % 8D``: offsets of the ops that must end before ``op``, and the ranks of
    the ops it enables, in the pass's time direction (time runs backwards when ``reverse``: a B
    then waits for the B of the previous stage and enables the F)."""
    per_pipeline = 2 * num_ranks
    layout = bitpipe_placement(num_ranks)
    needs: list[tuple[int, ...]] = []
    enables: list[tuple[int, ...]] = []
    for stage in range(4 * num_ranks):
        position = stage % per_pipeline
        first, last = position == 0, position == per_pipeline - 1
        # F(s) needs F(s-1); B(s) needs F(s) and B(s+1)
        needs += [() if first else (-2,), (-1,) if last else (-1, 2)]
        # F(s) enables B(s) and F(s+1); B(s) enables B(s-1)
        enables += [(1,) if last else (1, 2), () if first else (-2,)]
    if reverse:
        needs, enables = enables, needs
    width = len(needs)
    rank_of = [layout.rank_of(slot // 2) for slot in range(width)]
    enabled_ranks = [
        tuple(rank_of[slot + offset] for offset in offsets) for slot, offsets in enumerate(enables)
    ]
    return needs, enabled_ranks


def _list_schedule(
    num_ranks: int,
    programs: list[list[int]],
    window: int,
    horizon: int | None,
    reverse: bool,
    cap: int | None = None,
    lookahead: int | None = None,
) -> tuple[list[list[int]], int] | None:
    """Time ``programs`` (already in the pass's time order) with F=1, B=2 and reorder the first
    ``window`` ops of each rank; stop once every rank has run its first ``horizon`` ops (None:
    all of them). Returns the new programs and the latest end time, or None if no rank can go on.

    Time runs in integer steps; at each step the ranks woken then (by their own last op ending
    or by an input arriving) act in rank order. A free rank runs the first of its next D/2+2
    unplaced window ops whose inputs are there, skipping an op that would stash more than 2D
    chunk activations (an F; a B when ``reverse``); past its window it runs its program in
    order. With ``window`` 0 and ``horizon`` None this is the simulator's timeline. ``cap`` and
    ``lookahead`` replace 2D and D/2+2 (the memory knob's reordered ends)."""
    width = 8 * num_ranks
    needs, enables = _dependencies(num_ranks, reverse)
    stashing = 1 if reverse else 0
    lookahead = num_ranks // 2 + 2 if lookahead is None else lookahead
    cap = 2 * num_ranks if cap is None else cap
    never = 1 << 62
    end = [never] * (max(max(program) for program in programs) + 1)
    unplaced = [program[:window] for program in programs]
    chosen: list[list[int]] = [[] for _ in programs]
    placed = [0] * num_ranks
    stash = [0] * num_ranks
    free_at = [0] * num_ranks
    stops = [
        len(program) if horizon is None else min(horizon, len(program)) for program in programs
    ]
    running = sum(1 for stop in stops if stop)
    wakes: dict[int, set[int]] = {0: set(range(num_ranks))}
    now = -1
    while running:
        if not wakes:
            return None
        now += 1
        woken = wakes.pop(now, None)
        if woken is None:
            continue
        for rank in sorted(woken):
            if free_at[rank] > now:
                continue
            candidates = unplaced[rank]
            op = -1
            if candidates:
                for index in range(min(lookahead, len(candidates))):
                    candidate = candidates[index]
                    if (candidate & 1) == stashing and stash[rank] >= cap:
                        continue
                    for offset in needs[candidate % width]:
                        if end[candidate + offset] > now:
                            break
                    else:
                        op = candidates.pop(index)
                        chosen[rank].append(op)
                        break
            elif placed[rank] < len(programs[rank]):
                candidate = programs[rank][placed[rank]]
                for offset in needs[candidate % width]:
                    if end[candidate + offset] > now:
                        break
                else:
                    op = candidate
            if op < 0:
                continue
            placed[rank] += 1
            running -= placed[rank] == stops[rank]
            stash[rank] += 1 if (op & 1) == stashing else -1
            finish = now + 1 + (op & 1)
            end[op] = free_at[rank] = finish
            woken_then = wakes.setdefault(finish, set())
            woken_then.add(rank)
            for enabled_rank in enables[op % width]:
                if free_at[enabled_rank] <= finish:
                    woken_then.add(enabled_rank)
    latest = max(free_at)
    return [order + program[window:] for order, program in zip(chosen, programs)], latest


def _reorder_ops(
    num_ranks: int,
    programs: list[list[int]],
    cap: int | None = None,
    lookahead: int | None = None,
) -> list[list[int]] | None:
    """The warm-up pass, then the cool-down pass backwards in time; None if either stalls.
    ``cap`` / ``lookahead``: as in ``_list_schedule`` (default 2D and D/2+2)."""
    window = reorder_window(num_ranks)
    # warm-up: the first 6D ops of every rank, list-scheduled forwards in time
    warmed = _list_schedule(num_ranks, programs, window, window, False, cap, lookahead)
    if warmed is None:
        return None
    # cool-down: the last 6D ops, list-scheduled on the reversed programs (B before F)
    backwards = [program[::-1] for program in warmed[0]]
    cooled = _list_schedule(num_ranks, backwards, window, window, True, cap, lookahead)
    if cooled is None:
        return None
    return [program[::-1] for program in cooled[0]]


def reorder_ends(
    num_ranks: int, programs: tuple[tuple[Action, ...], ...]
) -> tuple[tuple[Action, ...], ...] | None:
    """``programs`` (a steady-state order, N >= 4D) with the first and last 6D actions of every
    rank reordered as in the module docstring; None if a pass stalls."""
    reordered = _reorder_ops(num_ranks, [_encode(num_ranks, program) for program in programs])
    if reordered is None:
        return None
    return tuple(_decode(num_ranks, program) for program in reordered)


def _flat_idle(num_ranks: int, programs: list[list[int]]) -> int:
    """Idle time per rank (the most busy rank's) of integer programs with F=1, B=2."""
    timed = _list_schedule(num_ranks, programs, 0, None, reverse=False)
    assert timed is not None, "a valid order always runs to the end"
    busy = max(sum(1 + (op & 1) for op in program) for program in programs)
    return timed[1] - busy


@dataclass(frozen=True)
class ReorderedEnds:
    """Reordered warm-up and cool-down of one D, taken from N0 = 4D microbatches.

    ``head[rank]`` / ``tail[rank]`` are the first / last 6D actions of the rank (``tail`` with
    the microbatches of N0); ``idle`` is the idle time per rank with F=1, B=2, for any N >= N0.
    """

    head: tuple[tuple[Action, ...], ...]
    tail: tuple[tuple[Action, ...], ...]
    idle: int


@functools.lru_cache(maxsize=None)
def reordered_ends(
    num_ranks: int, cap: int | None = None, lookahead: int | None = None
) -> ReorderedEnds | None:
    """The reordered ends of D ranks, computed at N0 = 4D; None if a pass stalls. ``cap``
    (default 2D) bounds the chunk activations the passes let a rank stash, ``lookahead``
    (default D/2+2) how far ahead they look."""
    base = REORDER_FROM_UNITS * num_ranks
    steady = steady_programs(num_ranks, base)
    encoded = [_encode(num_ranks, program) for program in steady]
    reordered = _reorder_ops(num_ranks, encoded, cap, lookahead)
    if reordered is None:
        return None
    window = reorder_window(num_ranks)
    return ReorderedEnds(
        head=tuple(_decode(num_ranks, program[:window]) for program in reordered),
        tail=tuple(_decode(num_ranks, program[-window:]) for program in reordered),
        idle=_flat_idle(num_ranks, reordered),
    )


def _shifted(program: tuple[Action, ...], shift: int) -> tuple[Action, ...]:
    """``program`` with ``shift`` added to every microbatch."""
    return tuple(Action(stage, kind, m + shift) for stage, kind, m in program)


def reordered_programs(
    num_ranks: int, num_microbatches: int, ends: ReorderedEnds | None = None
) -> tuple[tuple[Action, ...], ...]:
    """The steady state with reordered ends, N >= 4D: the cached head, the steady middle, the
    cached tail with microbatches shifted by N - N0 (a multiple of D: same directions).
    ``ends``: default ``reordered_ends(D)``."""
    ends = reordered_ends(num_ranks) if ends is None else ends
    assert ends is not None, "only called where reordered_ends exists"
    shift = num_microbatches - REORDER_FROM_UNITS * num_ranks
    window = reorder_window(num_ranks)
    steady = steady_programs(num_ranks, num_microbatches)
    return tuple(
        head + middle[window:-window] + _shifted(tail, shift)
        for head, middle, tail in zip(ends.head, steady, ends.tail, strict=True)
    )


# --- the memory knob: orders under a stash cap ---------------------------------------------
# ``max_stash`` (D..3D chunk activations per rank) picks, among a fixed pool of orders, the one
# with the least idle time (F=1, B=2) whose peak stash is within the cap. Each candidate's
# peak is measured on its own programs, so the cap always holds; the pool for a larger cap
# contains the pool for a smaller one, so the chosen idle never grows with the cap.


@dataclass(frozen=True)
class Stretch:
    """An order from an ideal timeline: microbatch pair j (the j-th down and the j-th up
    microbatch) starts at ``period * j`` (the up one ``offset`` later); its forward at pipeline
    position k is due ``forward_hop / 2 * k`` after its start, and its backward at position k
    ``backward_hop / 2 * (2D-1-k)`` after the last forward ends. Every rank runs its actions in
    due order (ties: backwards first, then microbatch, then stage). Due times grow along every
    dependency, so the order cannot deadlock. Short hops (1 and 2 units, the critical path)
    stash about D+1 chunk activations per rank; 3 and 3 stash 2D as the steady state does; a
    period over 12 units (one pair's work per rank) stashes less again, at a bubble per pair."""

    forward_hop: int
    backward_hop: int
    offset: int
    period: int = 12


STRETCHES: tuple[Stretch, ...] = tuple(
    Stretch(forward, backward, offset)
    for forward, backward in ((2, 4), (3, 4), (4, 4), (4, 5), (4, 6), (5, 5), (5, 6), (6, 6))
    for offset in (0, 6)
) + tuple(
    Stretch(2, 4, offset, period)
    for period in (13, 14, 15, 16, 18, 24, 36)
    for offset in (0, 6)
)
"""The stretched orders the knob chooses from (every D); ``serial_stretch`` is added to them."""


def serial_stretch(num_ranks: int) -> Stretch:
    """One microbatch at a time (the period is a microbatch's whole span): stashes 2 <= D."""
    return Stretch(2, 4, 6 * num_ranks, 12 * num_ranks)


def stretched_programs(
    num_ranks: int, num_microbatches: int, stretch: Stretch
) -> tuple[tuple[Action, ...], ...]:
    """Every rank's order in the ideal timeline of ``stretch`` (times in half units)."""
    per_pipeline = 2 * num_ranks
    rank_of = bitpipe_placement(num_ranks).stage_ranks
    last_forward = stretch.forward_hop * (per_pipeline - 1) + 2
    due: list[list[tuple[int, int, int, Action]]] = [[] for _ in range(num_ranks)]
    for pipeline, microbatches in enumerate(_microbatches_by_pipeline(num_ranks, num_microbatches)):
        for pair, microbatch in enumerate(microbatches):
            start = 2 * (stretch.period * pair + stretch.offset * pipeline)
            for position in range(per_pipeline):
                stage = pipeline * per_pipeline + position
                rank = due[rank_of[stage]]
                forward = start + stretch.forward_hop * position
                backward = start + last_forward + stretch.backward_hop * (per_pipeline - 1 - position)
                rank.append((forward, 1, microbatch, Action(stage, Kind.F, microbatch)))
                rank.append((backward, 0, microbatch, Action(stage, Kind.B, microbatch)))
    return tuple(tuple(item[3] for item in sorted(rank)) for rank in due)


def stash_peak(programs: tuple[tuple[Action, ...], ...]) -> int:
    """Most chunk activations any rank stashes: +1 at F, -1 at B or, for split programs, at W."""
    split = any(action.kind is Kind.W for program in programs for action in program)
    freeing = Kind.W if split else Kind.B
    peak = 0
    for program in programs:
        live = 0
        for action in program:
            if action.kind is Kind.F:
                live += 1
                peak = max(peak, live)
            elif action.kind is freeing:
                live -= 1
    return peak


def stash_eval_microbatches(num_ranks: int, num_microbatches: int) -> int:
    """Where the knob measures idle to choose an order: N itself up to 8D, else 8D."""
    return min(num_microbatches, 8 * num_ranks)


def simulated_idle(programs: tuple[tuple[Action, ...], ...], num_ranks: int, split: bool) -> float:
    """Idle per rank (makespan - most busy) with F=1, B=2 (I=W=1 when ``split``)."""
    from megatron_bitpipe.schedules.simulate import Costs, simulate

    costs = Costs(forward=1, backward=2, input_grad=1, weight_grad=1)
    num_microbatches = len(programs[0]) // (6 if split else 4)
    result = simulate(_schedule("probe", num_ranks, num_microbatches, programs), costs)
    return result.makespan - max(result.busy)


@functools.lru_cache(maxsize=None)
def stretch_table(
    num_ranks: int, num_microbatches: int, split: bool
) -> tuple[tuple[int, float, Stretch], ...]:
    """``(peak, idle, stretch)`` of every pool order at ``num_microbatches`` (split orders: the
    F/B order with its Ws placed by ``weight_fill.fill`` under its own F/B peak, which keeps the
    split peak at or under it)."""
    from megatron_bitpipe.schedules.weight_fill import fill

    table = []
    for stretch in STRETCHES + (serial_stretch(num_ranks),):
        programs = stretched_programs(num_ranks, num_microbatches, stretch)
        peak = stash_peak(programs)
        if split:
            placement = bitpipe_placement(num_ranks)
            programs = fill(placement, programs, num_microbatches, cap=peak)
            peak = stash_peak(programs)
        table.append((peak, simulated_idle(programs, num_ranks, split), stretch))
    return tuple(table)


def capped_reorder_caps(num_ranks: int, max_stash: int) -> tuple[int, ...]:
    """Caps above 2D the reordered ends are tried with: 2D + k * max(1, D/4) up to ``max_stash``
    (a fixed ladder, so a larger ``max_stash`` tries a superset)."""
    step = max(1, num_ranks // 4)
    return tuple(range(2 * num_ranks + step, max_stash + 1, step))


def best_stretch(
    num_ranks: int, num_microbatches: int, max_stash: int, split: bool
) -> tuple[float, Stretch] | None:
    """The pool order with the least idle (measured at ``stash_eval_microbatches``) whose peak
    is at most ``max_stash``; ties: the earlier in the pool. None if none fits."""
    probe = stash_eval_microbatches(num_ranks, num_microbatches)
    fitting = [
        (idle, index, stretch)
        for index, (peak, idle, stretch) in enumerate(stretch_table(num_ranks, probe, split))
        if peak <= max_stash
    ]
    if not fitting:
        return None
    idle, _, stretch = min(fitting)
    return idle, stretch


def default_order_idle(num_ranks: int, num_microbatches: int) -> float:
    """Idle (F=1, B=2) of today's default ``bitpipe`` order (every form is pinned by tests)."""
    order = _choose_order(num_ranks, num_microbatches, num_ranks)
    if order == "reordered":
        ends = reordered_ends(num_ranks)
        assert ends is not None
        return ends.idle
    if order == "steady":
        return steady_idle(num_ranks)
    return official_idle(num_ranks, num_microbatches)


def capped_programs(
    num_ranks: int, num_microbatches: int, max_stash: int
) -> tuple[tuple[tuple[Action, ...], ...], str]:
    """``bitpipe``'s order under ``max_stash`` and its name: the least idle (F=1, B=2) of
    today's order (from a cap of 2D), the reordered ends re-timed under the caps of
    ``capped_reorder_caps`` (N >= 4D, D >= 4) and the stretched pool orders within the cap.
    Ties: that order. The peak stash of the result is at most ``max_stash``."""
    candidates: list[tuple[float, int, str, object]] = []
    if max_stash >= 2 * num_ranks:
        candidates.append((default_order_idle(num_ranks, num_microbatches), 0, "default", None))
        if num_ranks >= 4 and num_microbatches >= REORDER_FROM_UNITS * num_ranks:
            for cap in capped_reorder_caps(num_ranks, max_stash):
                for lookahead in (num_ranks // 2 + 2, num_ranks + 2):
                    ends = reordered_ends(num_ranks, cap, lookahead)
                    if ends is not None:
                        candidates.append((ends.idle, len(candidates), f"reordered-{cap}", ends))
    stretched = best_stretch(num_ranks, num_microbatches, max_stash, split=False)
    if stretched is not None:
        candidates.append((stretched[0], len(candidates), "stretched", stretched[1]))
    _, _, name, chosen = min(candidates, key=lambda candidate: candidate[:2])
    if name == "default":
        default = generate(num_ranks, num_microbatches)
        return default.programs, str(dict(default.options)["order"])
    if isinstance(chosen, ReorderedEnds):
        return reordered_programs(num_ranks, num_microbatches, chosen), name
    assert isinstance(chosen, Stretch)
    return stretched_programs(num_ranks, num_microbatches, chosen), stretch_name(chosen)


def stretch_name(stretch: Stretch) -> str:
    """The stretched order's label in ``Schedule.options``."""
    return (
        f"stretched-f{stretch.forward_hop}-b{stretch.backward_hop}"
        f"-o{stretch.offset}-p{stretch.period}"
    )


# --- generators ----------------------------------------------------------------------------


def _schedule(
    name: str,
    num_ranks: int,
    num_microbatches: int,
    programs: tuple[tuple[Action, ...], ...],
    options: tuple[tuple[str, object], ...] = (),
) -> Schedule:
    return Schedule(
        name,
        bitpipe_placement(num_ranks),
        num_microbatches,
        microbatch_pipelines(num_ranks, num_microbatches),
        programs,
        options,
    )


def generate_official(num_ranks: int, num_microbatches: int) -> Schedule:
    """The official BitPipe order: units of D microbatches, directly concatenated."""
    programs = official_programs(num_ranks, num_microbatches)
    return _schedule("bitpipe-official", num_ranks, num_microbatches, programs)


def steady_schedule(num_ranks: int, num_microbatches: int) -> Schedule:
    """The steady-state order alone, whatever N (``bitpipe`` uses it only where it is faster)."""
    return _schedule(
        "bitpipe-steady", num_ranks, num_microbatches, steady_programs(num_ranks, num_microbatches)
    )


def _choose_order(num_ranks: int, num_microbatches: int, limit: int) -> str:
    """"official", "steady" or "reordered": the least idle time with F=1, B=2 among the orders
    that keep at most ``limit`` microbatches per direction in flight (ties: the official order)."""
    official = official_idle(num_ranks, num_microbatches)
    if limit < num_ranks:
        return "official"
    if num_ranks >= 4 and num_microbatches >= REORDER_FROM_UNITS * num_ranks:
        ends = reordered_ends(num_ranks)
        if ends is not None:
            return "reordered" if ends.idle < official else "official"
    return "steady" if steady_idle(num_ranks) < official else "official"


def generate(
    num_ranks: int,
    num_microbatches: int,
    max_inflight: int | None = None,
    max_stash: int | None = None,
) -> Schedule:
    """The fastest (F=1, B=2 per chunk) of the official order, the steady state and the steady
    state with reordered ends (N >= 4D) that keeps at most ``max_inflight`` microbatches per
    direction in flight (default D; the official order needs D/2, the others D). All stash at
    most 2D chunk activations per rank. With ``max_stash`` (D..3D, excludes ``max_inflight``):
    ``capped_programs``, which stashes at most ``max_stash``."""
    if max_stash is not None:
        programs, order = capped_programs(num_ranks, num_microbatches, max_stash)
        options = (("max_stash", max_stash), ("order", order))
        return _schedule("bitpipe", num_ranks, num_microbatches, programs, options)
    limit = num_ranks if max_inflight is None else max_inflight
    order = _choose_order(num_ranks, num_microbatches, limit)
    if order == "reordered":
        programs = reordered_programs(num_ranks, num_microbatches)
    elif order == "steady":
        programs = steady_programs(num_ranks, num_microbatches)
    else:
        programs = official_programs(num_ranks, num_microbatches)
    options = (("max_inflight", limit), ("order", order))
    return _schedule("bitpipe", num_ranks, num_microbatches, programs, options)


register(
    ScheduleSpec(
        name="bitpipe",
        generate=generate,
        check=check_inflight,
        summary="BitPipe, bidirectional V (arXiv 2410.19367) with a steady state: idle flat in N",
        options=("max_inflight", "max_stash"),
        bidirectional=True,
        chunks_per_rank=4,
    )
)
register(
    ScheduleSpec(
        name="bitpipe-official",
        generate=generate_official,
        check=check_official,
        summary="BitPipe as in wuhouming/BitPipe: units of D microbatches, directly concatenated",
        bidirectional=True,
        chunks_per_rank=4,
    )
)
