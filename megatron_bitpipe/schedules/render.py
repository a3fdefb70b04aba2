"""Ways to look at a schedule: text grids, CSV, Chrome trace JSON (Perfetto) and PNG.

    text_grid(simulate(s))     rank x time table of a simulated (or measured) run
    program_grid(s)            rank x position table, order only, for schedules without costs
    to_csv(s) / from_csv(...)  the schedule CSV, one line per rank, and back
    chrome_trace(events, ...)  {"traceEvents": [...]}, one process (track) per rank
    plot_png(result, path)     matplotlib lanes, one per rank (matplotlib imported only there)

Everything here reads the IR and ``Event`` spans only; nothing decides an order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from megatron_bitpipe.schedules.ir import Action, Kind, Schedule, parse_programs
from megatron_bitpipe.schedules.placement import Placement
from megatron_bitpipe.schedules.simulate import Event, SimResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes

IDLE = "."
CONTINUED = "-"
PIPELINE_NAMES = ("down", "up")

MICROSECONDS = 1.0
"""``time_unit`` for event times already in microseconds (the default; also simulated units)."""
MILLISECONDS = 1e3
SECONDS = 1e6
"""``time_unit`` for measured event times in seconds (``time.perf_counter`` spans)."""


# --- text ----------------------------------------------------------------------------------------


def text_grid(result: SimResult, *, unit: float | None = None) -> str:
    """Rank x time table of ``result``: one column per ``unit`` of time.

    Roughly: each compute action prints its text (``5F2``) in the slot where it starts and
    ``-`` in the further slots it covers; ``.`` is idle. Replica syncs with a duration get a
    ``sync`` row under their rank, written ``{stage}R``. ``unit`` defaults to the shortest action;
    with durations that are not multiples of it, spans are rounded to whole slots. The last
    column is each rank's bubble; the footer gives the makespan and the overall bubble.
    """
    timed = [event for event in result.events if event.end > event.start]
    if not timed:
        return f"{result.name}: no timed actions\n"
    unit = unit if unit is not None else min(event.end - event.start for event in timed)
    if unit <= 0:
        raise ValueError(f"text_grid: unit must be > 0, got {unit}")
    num_slots = max(1, math.ceil(result.makespan / unit - 1e-9))
    syncs = [event for event in result.sync_events if event.end > event.start]
    width = max(len(_cell_text(event)) for event in timed + syncs)
    compute_by_rank = _by_rank(timed, len(result.busy))
    syncs_by_rank = _by_rank(syncs, len(result.busy))
    lanes: list[tuple[str, list[str], str]] = []
    for rank, bubble in enumerate(result.bubble):
        cells = _lane(compute_by_rank[rank], unit, num_slots, width)
        lanes.append((f"rank {rank}", cells, f"  {bubble:6.1%}"))
        if syncs_by_rank[rank]:
            lanes.append(("  sync", _lane(syncs_by_rank[rank], unit, num_slots, width), ""))
    label_width = max(len("time"), *(len(label) for label, _, _ in lanes))
    ticks = [f"{slot * unit:g}" for slot in range(num_slots)]
    lines = [_ruler("time", label_width, ticks, [width] * num_slots) + "  bubble"]
    for label, cells, suffix in lanes:
        row = f"{label:<{label_width}} |" + "".join(f" {cell:>{width}}" for cell in cells)
        lines.append((row + suffix).rstrip())
    lines.append(
        f"makespan {result.makespan:g}, bubble {result.bubble_ratio:.1%} over all ranks, "
        f"1 column = {unit:g}"
    )
    return "\n".join(lines) + "\n"


def _by_rank(events: list[Event], num_ranks: int) -> list[list[Event]]:
    grouped: list[list[Event]] = [[] for _ in range(num_ranks)]
    for event in events:
        grouped[event.rank].append(event)
    return grouped


def _cell_text(event: Event) -> str:
    action = event.action
    return f"{action.stage}R" if action.kind is Kind.REDUCE_GRAD else str(action)


def _lane(events: list[Event], unit: float, num_slots: int, width: int) -> list[str]:
    """Cells of one lane: continuation marks first, so a start is never overwritten by one."""
    cells = [IDLE] * num_slots
    spans = []
    for event in events:
        first = min(num_slots - 1, round(event.start / unit))
        last = max(first + 1, min(num_slots, round(event.end / unit)))
        spans.append((first, last, _cell_text(event)))
    for first, last, _ in spans:
        for slot in range(first + 1, last):
            cells[slot] = CONTINUED * width
    for first, _, text in spans:
        cells[first] = text
    return cells


def _ruler(title: str, label_width: int, ticks: list[str], widths: list[int]) -> str:
    """Header line: ``title |`` then each column's tick, right-aligned over its column, skipping
    ticks that would touch the one before."""
    header = f"{title:<{label_width}} |"
    column_end = len(header)
    for tick, width in zip(ticks, widths, strict=True):
        column_start = column_end + 1
        column_end = column_start + width
        tick_start = column_end - len(tick) if len(tick) <= width else column_start
        if tick_start > len(header):
            header = header.ljust(tick_start) + tick
    return header.ljust(column_end)


def program_grid(schedule: Schedule) -> str:
    """Rank x position table of ``schedule``'s programs: order only, no timing.

    Each column is as wide as its widest action, so lowered programs stay compact.
    """
    length = max((len(program) for program in schedule.programs), default=0)
    widths = [
        max(len(str(program[position])) for program in schedule.programs if position < len(program))
        for position in range(length)
    ]
    label_width = max(len("step"), len(f"rank {schedule.num_ranks - 1}"))
    ticks = [str(position) for position in range(length)]
    lines = [_ruler("step", label_width, ticks, widths).rstrip()]
    for rank, program in enumerate(schedule.programs):
        cells = "".join(
            f" {str(action):>{width}}" for action, width in zip(program, widths, strict=False)
        )
        lines.append(f"{f'rank {rank}':<{label_width}} |{cells}")
    return "\n".join(lines) + "\n"


# --- CSV -----------------------------------------------------------------------------------------


def to_csv(schedule: Schedule) -> str:
    """The schedule CSV: one line per rank, rank 0 first, actions comma separated, no header."""
    return schedule.to_csv()


def from_csv(
    text: str,
    *,
    name: str,
    placement: Placement,
    num_microbatches: int | None = None,
    microbatch_pipeline: tuple[int, ...] | None = None,
    options: tuple[tuple[str, object], ...] = (),
) -> Schedule:
    """Parse ``to_csv`` output back into a Schedule (not validated: call ``validate``).

    ``num_microbatches`` defaults to one more than the largest microbatch in the text;
    ``microbatch_pipeline`` to the pipeline of the stages each microbatch's actions run on.
    Raises ValueError if the row count is not the placement's rank count.
    """
    programs = parse_programs(text)
    if len(programs) != placement.num_ranks:
        raise ValueError(
            f"{name}: the CSV has {len(programs)} rows but the {placement.kind} placement has "
            f"{placement.num_ranks} ranks (one row per rank)"
        )
    if num_microbatches is None:
        num_microbatches = 1 + max(
            (a.microbatch for program in programs for a in program if a.microbatch is not None),
            default=-1,
        )
    if microbatch_pipeline is None:
        microbatch_pipeline = _pipelines_from_actions(programs, placement, num_microbatches)
    return Schedule(name, placement, num_microbatches, microbatch_pipeline, programs, options)


def _pipelines_from_actions(
    programs: tuple[tuple[Action, ...], ...], placement: Placement, num_microbatches: int
) -> tuple[int, ...]:
    pipelines = [0] * num_microbatches
    for program in programs:
        for action in program:
            if action.microbatch is not None and action.microbatch < num_microbatches:
                pipelines[action.microbatch] = placement.pipeline_of(action.stage)
    return tuple(pipelines)


# --- Chrome trace --------------------------------------------------------------------------------

TRACE_COLOURS = {
    Kind.F: "rail_response",
    Kind.B: "rail_idle",
    Kind.I: "rail_load",
    Kind.W: "thread_state_running",
    Kind.REDUCE_GRAD: "generic_work",
}
"""Chrome's reserved colour names ("cname"): F blue, B orange, I teal, W green, sync grey."""
COMM_COLOUR = "thread_state_iowait"
COMPUTE_TID, SYNC_TID = 0, 1


def chrome_trace(
    events: Iterable[Event],
    sync_events: Iterable[Event] = (),
    *,
    name: str = "schedule",
    placement: Placement | None = None,
    time_unit: float = MICROSECONDS,
) -> dict[str, object]:
    """Chrome trace event JSON (load in Perfetto or chrome://tracing): one process per rank.

    Each event becomes an "X" span named like ``F mb2 stage5`` on thread "compute", each sync
    event one on thread "grad sync". ``ts``/``dur`` are event times times ``time_unit``
    (microseconds per time unit: ``SECONDS`` for measured ``perf_counter`` spans). With
    ``placement``, args also give the stage's local chunk and pipeline.
    """
    compute = list(events)
    syncs = list(sync_events)
    ranks = sorted({event.rank for event in compute + syncs})
    trace: list[dict[str, object]] = []
    for rank in ranks:
        trace.extend(_rank_metadata(rank, has_syncs=any(e.rank == rank for e in syncs)))
    for tid, group in ((COMPUTE_TID, compute), (SYNC_TID, syncs)):
        trace.extend(_trace_event(event, tid, placement, time_unit) for event in group)
    return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": {"schedule": name}}


def _rank_metadata(rank: int, *, has_syncs: bool) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [
        {"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}},
        {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}},
        {
            "name": "thread_name",
            "ph": "M",
            "pid": rank,
            "tid": COMPUTE_TID,
            "args": {"name": "compute"},
        },
    ]
    if has_syncs:
        rows.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": rank,
                "tid": SYNC_TID,
                "args": {"name": "grad sync"},
            }
        )
    return rows


def _trace_event(
    event: Event, tid: int, placement: Placement | None, time_unit: float
) -> dict[str, object]:
    action = event.action
    kind = action.kind.value
    if action.microbatch is None:
        label = f"{'sync' if action.kind is Kind.REDUCE_GRAD else kind} stage{action.stage}"
    else:
        label = f"{kind} mb{action.microbatch} stage{action.stage}"
    args: dict[str, object] = {
        "rank": event.rank,
        "stage": action.stage,
        "microbatch": action.microbatch,
        "kind": kind,
        "action": str(action),
    }
    if placement is not None:
        args["chunk"] = placement.chunk_of(action.stage)
        args["pipeline"] = PIPELINE_NAMES[placement.pipeline_of(action.stage)]
    return {
        "name": label,
        "cat": kind,
        "ph": "X",
        "pid": event.rank,
        "tid": tid,
        "ts": event.start * time_unit,
        "dur": (event.end - event.start) * time_unit,
        "cname": TRACE_COLOURS.get(action.kind, COMM_COLOUR),
        "args": args,
    }


def write_chrome_trace(
    path: str | Path,
    events: Iterable[Event],
    sync_events: Iterable[Event] = (),
    *,
    name: str = "schedule",
    placement: Placement | None = None,
    time_unit: float = MICROSECONDS,
) -> None:
    """Write ``chrome_trace(...)`` to ``path`` as JSON."""
    trace = chrome_trace(events, sync_events, name=name, placement=placement, time_unit=time_unit)
    Path(path).write_text(json.dumps(trace))


# --- PNG -----------------------------------------------------------------------------------------

PLOT_COLOURS = {
    Kind.F: "#1f77b4",
    Kind.B: "#ff7f0e",
    Kind.I: "#17becf",
    Kind.W: "#2ca02c",
    Kind.REDUCE_GRAD: "#7f7f7f",
}
"""Lane colours as in torch.distributed.pipelining's visualizer; grad sync grey."""
UP_HATCH = "////"
LANE_HEIGHT = 0.72
SYNC_HEIGHT = 0.16
MIN_FIGURE_WIDTH, MAX_FIGURE_WIDTH = 10.0, 24.0
PLOT_AREA_FRACTION = 0.85
"""Roughly the share of the figure width the time axis gets (the rest: labels, legend)."""
MIN_LABEL_POINTS, MAX_LABEL_POINTS = 4.5, 8.0


@dataclass(frozen=True)
class _Bar:
    rank: int
    start: float
    width: float
    kind: Kind
    up: bool
    label: str


def measured_result(name: str, events: Iterable[Event]) -> SimResult:
    """A SimResult holding measured spans (for ``text_grid``/``plot_png``); times from 0.

    Memory and message counts are not measured here and are reported as 0.
    """
    spans = list(events)
    origin = min((event.start for event in spans), default=0.0)
    shifted = [Event(e.rank, e.action, e.start - origin, e.end - origin) for e in spans]
    num_ranks = max((event.rank for event in shifted), default=-1) + 1
    busy = [0.0] * num_ranks
    for event in shifted:
        busy[event.rank] += event.end - event.start
    return SimResult(
        name=name,
        makespan=max((event.end for event in shifted), default=0.0),
        events=tuple(shifted),
        sync_events=(),
        busy=tuple(busy),
        peak_activations=(0,) * num_ranks,
        p2p_messages=0,
        p2p_bytes=0,
    )


def plot_png(
    result: SimResult,
    path: str | Path,
    *,
    title: str | None = None,
    placement: Placement | None = None,
) -> None:
    """Draw ``result`` as one horizontal lane per rank (rank 0 on top) and save a PNG at ``path``.

    F blue, B orange, I teal, W green; the up pipeline (needs ``placement``) is hatched and
    lighter; replica syncs are a thin grey bar under their rank. Microbatch numbers are written
    in the boxes wide enough to hold them. The title gives makespan and bubble.
    Raises ImportError, saying so, if matplotlib is not installed.
    """
    plt = _pyplot()
    num_ranks = len(result.busy)
    bars = [_bar(event, placement) for event in result.events if event.end > event.start]
    figure_width = _figure_width(bars, result.makespan)
    figure, axes = plt.subplots(figsize=(figure_width, 1.4 + 0.42 * num_ranks), dpi=110)
    _draw_bars(axes, bars)
    syncs = [event for event in result.sync_events if event.end > event.start]
    for event in syncs:
        axes.broken_barh(
            [(event.start, event.end - event.start)],
            (event.rank + LANE_HEIGHT / 2, SYNC_HEIGHT),
            facecolors=PLOT_COLOURS[Kind.REDUCE_GRAD],
        )
    _label_bars(axes, bars, result.makespan, figure_width)
    axes.set_yticks(range(num_ranks), [f"rank {rank}" for rank in range(num_ranks)])
    axes.set_ylim(num_ranks - 0.5 + SYNC_HEIGHT, -0.5)
    axes.set_xlim(0, result.makespan)
    axes.set_xlabel("time")
    heading = title if title is not None else result.name
    axes.set_title(f"{heading}: makespan {result.makespan:g}, bubble {result.bubble_ratio:.1%}")
    _legend(axes, bars, has_syncs=bool(syncs))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _pyplot() -> ModuleType:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plot_png needs matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar(event: Event, placement: Placement | None) -> _Bar:
    action = event.action
    up = placement is not None and placement.pipeline_of(action.stage) == 1
    label = "" if action.microbatch is None else str(action.microbatch)
    return _Bar(event.rank, event.start, event.end - event.start, action.kind, up, label)


def _draw_bars(axes: Axes, bars: list[_Bar]) -> None:
    """One broken_barh call per (rank, kind, pipeline): fast for 100k+ actions."""
    groups: dict[tuple[int, Kind, bool], list[tuple[float, float]]] = {}
    for bar in bars:
        groups.setdefault((bar.rank, bar.kind, bar.up), []).append((bar.start, bar.width))
    for (rank, kind, up), spans in groups.items():
        axes.broken_barh(
            spans,
            (rank - LANE_HEIGHT / 2, LANE_HEIGHT),
            facecolors=PLOT_COLOURS.get(kind, PLOT_COLOURS[Kind.REDUCE_GRAD]),
            alpha=0.6 if up else 1.0,
            hatch=UP_HATCH if up else None,
            edgecolor="white",
            linewidth=0.5,
        )


def _figure_width(bars: list[_Bar], makespan: float) -> float:
    """Inches: about a quarter inch per shortest action, between 10 and 24."""
    shortest = min((bar.width for bar in bars), default=makespan) or 1.0
    return min(MAX_FIGURE_WIDTH, max(MIN_FIGURE_WIDTH, 0.25 * makespan / shortest))


def _label_bars(axes: Axes, bars: list[_Bar], makespan: float, figure_width: float) -> None:
    """Write microbatch numbers in one font size, the largest (up to 8 pt) that fits the
    longest number in the shortest box; boxes too narrow even at 4.5 pt stay blank."""
    labelled = [bar for bar in bars if bar.label]
    if not labelled or makespan <= 0:
        return
    points_per_unit = figure_width * 72 * PLOT_AREA_FRACTION / makespan
    longest = max(len(bar.label) for bar in labelled)
    shortest = min(bar.width for bar in labelled) * points_per_unit
    font_size = max(MIN_LABEL_POINTS, min(MAX_LABEL_POINTS, (shortest - 2) / (0.62 * longest)))
    for bar in labelled:
        if bar.width * points_per_unit >= 0.62 * font_size * len(bar.label) + 2:
            axes.text(
                bar.start + bar.width / 2,
                bar.rank,
                bar.label,
                ha="center",
                va="center",
                fontsize=font_size,
                color="black" if bar.up else "white",
            )


def _legend(axes: Axes, bars: list[_Bar], *, has_syncs: bool) -> None:
    from matplotlib.patches import Patch

    present = {bar.kind for bar in bars}
    handles = [
        Patch(facecolor=PLOT_COLOURS[kind], label=kind.value)
        for kind in PLOT_COLOURS
        if kind in present
    ]
    if any(bar.up for bar in bars):
        handles.append(
            Patch(facecolor="white", edgecolor="black", hatch=UP_HATCH, label="up pipeline")
        )
    if has_syncs:
        handles.append(Patch(facecolor=PLOT_COLOURS[Kind.REDUCE_GRAD], label="grad sync"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
