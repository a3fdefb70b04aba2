"""BitPipe (arXiv 2410.19367): two mirrored V pipelines, 4 chunks per rank (``placement.bitpipe``).

Microbatch m goes down iff ``m % D < D/2``: blocks of D/2 alternate down/up. Two schedules:

``bitpipe-official``: the op order of wuhouming/BitPipe's ``bitpipe_schedule.py`` (notes/bitpipe.md
section 1.6): units of D microbatches, directly concatenated. With F=1, B=2 per chunk its idle
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

``bitpipe`` takes the steady state where that closed form beats the official one (N >= 4D for
D >= 8, N >= 8D for D = 4) and ``max_inflight`` (microbatches in flight per direction, default
D) allows D; otherwise it runs the official order. Both forms are checked against the simulator
in tests, so the choice costs nothing at plan time and is never slower with F=1, B=2.
"""

from __future__ import annotations

from megatron_bitpipe.schedules.errors import ScheduleConfigError
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule
from megatron_bitpipe.schedules.placement import bitpipe as bitpipe_placement
from megatron_bitpipe.schedules.registry import ScheduleSpec, register

DOWN, UP = 0, 1
Chunk = tuple[int, int]  # (pipeline, half): half 0 = first D stages of the pipeline, 1 = last D


def check(num_ranks: int, num_microbatches: int, **options: object) -> None:
    """Raise ScheduleConfigError unless D is even and N a multiple of D."""
    if num_ranks < 2 or num_ranks % 2:
        raise ScheduleConfigError(
            f"bitpipe: --pp {num_ranks} must be even and >= 2: the two pipelines pair rank r "
            f"with rank D-1-r, which hold the same stages"
        )
    if num_microbatches % num_ranks:
        raise ScheduleConfigError(
            f"bitpipe: --microbatches {num_microbatches} must be a multiple of --pp {num_ranks}: "
            f"microbatches go down and up in blocks of D/2"
        )


def check_inflight(num_ranks: int, num_microbatches: int, max_inflight: int | None = None) -> None:
    """``check`` plus: ``max_inflight`` must leave room for one official unit (D/2)."""
    check(num_ranks, num_microbatches)
    if max_inflight is not None and max_inflight < num_ranks // 2:
        raise ScheduleConfigError(
            f"bitpipe: --max-inflight {max_inflight} must be >= D/2 = {num_ranks // 2}: every "
            f"BitPipe order keeps a block of D/2 microbatches per direction in flight"
        )


def microbatch_pipelines(num_ranks: int, num_microbatches: int) -> tuple[int, ...]:
    """Blocks of D/2 alternating down/up: microbatch m goes down iff ``m % D < D/2``."""
    half = num_ranks // 2
    return tuple(DOWN if m % num_ranks < half else UP for m in range(num_microbatches))


def chunk_stage(num_ranks: int, rank: int, chunk: Chunk) -> int:
    """Global stage of ``(pipeline, half)`` on ``rank`` (DESIGN.md BitPipe table)."""
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
        streams.append([Action(stages[chunk], kind, next(upcoming[chunk])) for chunk in order])
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
    """Every rank's op order exactly as wuhouming/BitPipe generates it (notes/bitpipe.md 1.6)."""
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


def generate(num_ranks: int, num_microbatches: int, max_inflight: int | None = None) -> Schedule:
    """The faster (F=1, B=2 per chunk) of the official and the steady-state order that keeps at
    most ``max_inflight`` microbatches per direction in flight (default D; the official order
    needs D/2, the steady state D). Both stash at most 2D chunk activations per rank."""
    limit = num_ranks if max_inflight is None else max_inflight
    faster = steady_idle(num_ranks) < official_idle(num_ranks, num_microbatches)
    steady = limit >= num_ranks and faster
    if steady:
        programs = steady_programs(num_ranks, num_microbatches)
    else:
        programs = official_programs(num_ranks, num_microbatches)
    options = (("max_inflight", limit), ("order", "steady" if steady else "official"))
    return _schedule("bitpipe", num_ranks, num_microbatches, programs, options)


register(
    ScheduleSpec(
        name="bitpipe",
        generate=generate,
        check=check_inflight,
        summary="BitPipe, bidirectional V (arXiv 2410.19367) with a steady state: idle flat in N",
        options=("max_inflight",),
        bidirectional=True,
    )
)
register(
    ScheduleSpec(
        name="bitpipe-official",
        generate=generate_official,
        check=check,
        summary="BitPipe as in wuhouming/BitPipe: units of D microbatches, directly concatenated",
        bidirectional=True,
    )
)
