"""Chimera, the official BitPipe order and our BitPipe: structure, golden orders, timing, memory."""

from __future__ import annotations

import re

import pytest

from megatron_bitpipe.schedules import bitpipe
from megatron_bitpipe.schedules.errors import ScheduleConfigError
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.registry import build
from megatron_bitpipe.schedules.simulate import Costs, simulate
from megatron_bitpipe.schedules.validate import validate

BIDIRECTIONAL = ("chimera", "bitpipe", "bitpipe-official")
V_SHAPED = ("bitpipe", "bitpipe-official")
GRID = [(d, k * d) for d in (2, 4, 8) for k in (1, 2, 4)]
CHUNK_COSTS = Costs(forward=1.0, backward=2.0)

# wuhouming/BitPipe's bitpipe_schedule.py: the official code's order, 1-based "F<microbatch><d|u><stage>", no syncs
OFFICIAL_D4_N4 = """
F1d1 F2d1 F3u4 F3u5 F4u4 F4u5 F1d8 B1d8 F2d8 B2d8 B3u5 B3u4 B4u5 B4u4 B1d1 B2d1
F1d2 F3u3 F2d2 F4u3 F3u6 F1d7 F4u6 F2d7 B1d7 B3u6 B2d7 B4u6 B3u3 B1d2 B4u3 B2d2
F3u2 F1d3 F4u2 F2d3 F1d6 F3u7 F2d6 F4u7 B3u7 B1d6 B4u7 B2d6 B1d3 B3u2 B2d3 B4u2
F3u1 F4u1 F1d4 F1d5 F2d4 F2d5 F3u8 B3u8 F4u8 B4u8 B1d5 B1d4 B2d5 B2d4 B3u1 B4u1
"""
OFFICIAL_D4_N8 = """
F1d1 F2d1 F3u4 F3u5 F4u4 F4u5 F1d8 B1d8 F2d8 B2d8 B3u5 B3u4 B4u5 B4u4 B1d1 F5d1
  B2d1 F6d1 F7u4 F7u5 F8u4 F8u5 F5d8 B5d8 F6d8 B6d8 B7u5 B7u4 B8u5 B8u4 B5d1 B6d1
F1d2 F3u3 F2d2 F4u3 F3u6 F1d7 F4u6 F2d7 B1d7 B3u6 B2d7 B4u6 B3u3 B1d2 B4u3 B2d2
  F5d2 F7u3 F6d2 F8u3 F7u6 F5d7 F8u6 F6d7 B5d7 B7u6 B6d7 B8u6 B7u3 B5d2 B8u3 B6d2
F3u2 F1d3 F4u2 F2d3 F1d6 F3u7 F2d6 F4u7 B3u7 B1d6 B4u7 B2d6 B1d3 B3u2 B2d3 B4u2
  F7u2 F5d3 F8u2 F6d3 F5d6 F7u7 F6d6 F8u7 B7u7 B5d6 B8u7 B6d6 B5d3 B7u2 B6d3 B8u2
F3u1 F4u1 F1d4 F1d5 F2d4 F2d5 F3u8 B3u8 F4u8 B4u8 B1d5 B1d4 B2d5 B2d4 B3u1 F7u1
  B4u1 F8u1 F5d4 F5d5 F6d4 F6d5 F7u8 B7u8 F8u8 B8u8 B5d5 B5d4 B6d5 B6d4 B7u1 B8u1
"""
# a reference Chimera generator's order, D=4, N=4 (slot order, syncs left out)
CHIMERA_D4_N4 = """
F1d1 F2d1 F3u4 B3u4 F4u4 B4u4 B1d1 B2d1
F1d2 F3u3 F2d2 F4u3 B3u3 B1d2 B4u3 B2d2
F3u2 F1d3 F4u2 F2d3 B1d3 B3u2 B2d3 B4u2
F3u1 F4u1 F1d4 B1d4 F2d4 B2d4 B3u1 B4u1
"""


def parse_listing(text: str, stages_per_pipeline: int) -> tuple[tuple[Action, ...], ...]:
    """The listings' 1-based notation (docs/design.md, "The oracle"), one rank a line (indented
    lines continue it): up stage sK is global stage S + K-1."""
    programs = []
    for line in text.strip().replace("\n  ", " ").splitlines():
        program = []
        for cell in line.split():
            match = re.fullmatch(r"([FB])(\d+)([du])(\d+)", cell)
            kind, microbatch, pipeline, stage = match.groups()
            offset = stages_per_pipeline if pipeline == "u" else 0
            program.append(Action(offset + int(stage) - 1, Kind(kind), int(microbatch) - 1))
        programs.append(tuple(program))
    return tuple(programs)


def idle(schedule: Schedule) -> float:
    """Idle time per rank (the same on every rank for these schedules) with F=1, B=2."""
    result = simulate(schedule, CHUNK_COSTS)
    return result.makespan - max(result.busy)


def max_inflight(schedule: Schedule) -> list[int]:
    """Most microbatches per pipeline between their first forward's start and last backward's
    end, in the F=1, B=2 timeline."""
    layout = schedule.placement
    edges = []
    for event in simulate(schedule, CHUNK_COSTS).events:
        if layout.is_first(event.action.stage):
            pipeline = layout.pipeline_of(event.action.stage)
            if event.action.kind is Kind.F:
                edges.append((event.start, 1, pipeline))
            else:
                edges.append((event.end, -1, pipeline))
    count, most = [0, 0], [0, 0]
    for _, change, pipeline in sorted(edges):
        count[pipeline] += change
        most[pipeline] = max(most[pipeline], count[pipeline])
    return most


# --- structure on the grid D in {2, 4, 8}, N in {D, 2D, 4D} ---------------------------------


@pytest.mark.parametrize("name", BIDIRECTIONAL)
@pytest.mark.parametrize(("num_ranks", "num_microbatches"), GRID)
def test_schedule_validates_lowers_and_validates_again(name, num_ranks, num_microbatches):
    schedule = build(name, num_ranks, num_microbatches)
    lowered = lower(schedule)
    validate(lowered)
    assert lowered.compute_programs() == schedule.programs


@pytest.mark.parametrize("name", V_SHAPED)
@pytest.mark.parametrize(("num_ranks", "num_microbatches"), GRID)
def test_v_turn_sends_no_message(name, num_ranks, num_microbatches):
    lowered = lower(build(name, num_ranks, num_microbatches))
    per_pipeline = 2 * num_ranks
    turn_out = {num_ranks - 1, per_pipeline + num_ranks - 1}
    turn_in = {num_ranks, per_pipeline + num_ranks}
    for program in lowered.programs:
        for action in program:
            assert not (action.kind in (Kind.SEND_F, Kind.RECV_B) and action.stage in turn_out)
            assert not (action.kind in (Kind.SEND_B, Kind.RECV_F) and action.stage in turn_in)


@pytest.mark.parametrize("name", BIDIRECTIONAL)
@pytest.mark.parametrize(("num_ranks", "num_microbatches"), GRID)
def test_every_rank_syncs_each_of_its_stages_once(name, num_ranks, num_microbatches):
    lowered = lower(build(name, num_ranks, num_microbatches))
    for rank, program in enumerate(lowered.programs):
        synced = sorted(action.stage for action in program if action.kind is Kind.REDUCE_GRAD)
        assert synced == sorted(lowered.placement.rank_stages[rank])


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_microbatches_alternate_directions_in_blocks_of_half_d(name):
    schedule = build(name, 8, 16)
    assert schedule.microbatch_pipeline == (0, 0, 0, 0, 1, 1, 1, 1) * 2


# --- bad settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BIDIRECTIONAL)
@pytest.mark.parametrize("num_ranks", [1, 3, 5])
def test_odd_pipeline_size_is_rejected_naming_pp(name, num_ranks):
    with pytest.raises(ScheduleConfigError, match=r"--pp .*even.*D-1-r"):
        build(name, num_ranks, 2 * num_ranks)


@pytest.mark.parametrize("name", BIDIRECTIONAL)
@pytest.mark.parametrize(("num_ranks", "num_microbatches"), [(4, 6), (4, 2), (8, 12)])
def test_microbatches_not_a_multiple_of_d_are_rejected_naming_microbatches(
    name, num_ranks, num_microbatches
):
    with pytest.raises(ScheduleConfigError, match=r"--microbatches .*multiple of --pp"):
        build(name, num_ranks, num_microbatches)


def test_max_inflight_below_half_d_is_rejected_naming_the_setting():
    with pytest.raises(ScheduleConfigError, match="--max-inflight 1 must be >= D/2 = 2"):
        build("bitpipe", 4, 8, max_inflight=1)


def test_official_order_takes_no_max_inflight():
    with pytest.raises(ScheduleConfigError, match="--max-inflight not accepted"):
        build("bitpipe-official", 4, 8, max_inflight=4)


# --- Chimera ----------------------------------------------------------------------------------


def test_chimera_d4_n4_matches_the_generators_slot_table():
    assert build("chimera", 4, 4).programs == parse_listing(CHIMERA_D4_N4, 4)


@pytest.mark.parametrize("num_ranks", [4, 8])
@pytest.mark.parametrize("units", [1, 2])
def test_chimera_bubble_with_equal_costs_is_the_papers_formula(num_ranks, units):
    num_microbatches = units * num_ranks
    result = simulate(build("chimera", num_ranks, num_microbatches), Costs(forward=1, backward=1))
    expected = (num_ranks - 2) / (2 * num_microbatches + num_ranks - 2)
    assert result.bubble_ratio == pytest.approx(expected)


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), [(4, 8), (8, 16), (8, 32)])
def test_chimera_stashes_between_half_d_plus_one_and_d_stage_activations(
    num_ranks, num_microbatches
):
    peaks = simulate(build("chimera", num_ranks, num_microbatches)).peak_activations
    assert min(peaks) == num_ranks // 2 + 1
    assert max(peaks) == num_ranks


# --- the official BitPipe order ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_microbatches", "listing"), [(4, OFFICIAL_D4_N4), (8, OFFICIAL_D4_N8)]
)
def test_official_order_matches_the_reference_listing(num_microbatches, listing):
    assert build("bitpipe-official", 4, num_microbatches).programs == parse_listing(listing, 8)


@pytest.mark.parametrize(
    ("num_ranks", "num_microbatches", "makespan"),
    [(4, 4, 28), (4, 8, 54), (4, 16, 106), (4, 32, 210), (8, 8, 60), (8, 16, 114), (8, 32, 222)],
)
def test_official_makespan_matches_the_reference(num_ranks, num_microbatches, makespan):
    result = simulate(build("bitpipe-official", num_ranks, num_microbatches), CHUNK_COSTS)
    assert result.makespan == makespan


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), GRID)
def test_official_stashes_at_most_2d_chunk_activations(num_ranks, num_microbatches):
    peaks = simulate(build("bitpipe-official", num_ranks, num_microbatches)).peak_activations
    assert max(peaks) == 2 * num_ranks


# --- our BitPipe ------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), GRID + [(4, 32), (8, 64)])
def test_bitpipe_is_never_slower_than_the_official_order(num_ranks, num_microbatches):
    ours = simulate(build("bitpipe", num_ranks, num_microbatches), CHUNK_COSTS)
    official = simulate(build("bitpipe-official", num_ranks, num_microbatches), CHUNK_COSTS)
    assert ours.makespan <= official.makespan


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), GRID + [(4, 32), (8, 64)])
def test_bitpipe_stashes_at_most_2d_chunk_activations(num_ranks, num_microbatches):
    peaks = simulate(build("bitpipe", num_ranks, num_microbatches)).peak_activations
    assert max(peaks) <= 2 * num_ranks


@pytest.mark.parametrize("num_ranks", [4, 8])
def test_bitpipe_idle_stops_growing_with_n(num_ranks):
    idles = [idle(build("bitpipe", num_ranks, k * num_ranks)) for k in (8, 12, 16)]
    assert idles[0] == idles[1] == idles[2]
    assert idles[0] < idle(build("bitpipe-official", num_ranks, 8 * num_ranks))


@pytest.mark.parametrize("num_ranks", [2, 4, 6, 8, 10, 12])
@pytest.mark.parametrize("units", [1, 3])
def test_idle_formulas_behind_the_choice_match_the_simulator(num_ranks, units):
    num_microbatches = units * num_ranks
    steady = bitpipe.steady_schedule(num_ranks, num_microbatches)
    validate(steady)
    assert idle(steady) == bitpipe.steady_idle(num_ranks)
    official = build("bitpipe-official", num_ranks, num_microbatches)
    assert idle(official) == bitpipe.official_idle(num_ranks, num_microbatches)


@pytest.mark.parametrize("num_ranks", [4, 6, 8])
def test_steady_state_keeps_exactly_2d_chunk_activations(num_ranks):
    steady = bitpipe.steady_schedule(num_ranks, 8 * num_ranks)
    assert simulate(steady).peak_activations == (2 * num_ranks,) * num_ranks


def test_steady_state_alternates_one_forward_and_one_backward():
    program = bitpipe.steady_programs(8, 64)[3]
    middle = "".join(action.kind.value for action in program[100:-100])
    assert "FF" not in middle and "BB" not in middle


def test_bitpipe_switches_to_the_reordered_steady_state_only_where_it_is_faster():
    assert dict(build("bitpipe", 8, 16).options)["order"] == "official"
    assert dict(build("bitpipe", 8, 32).options)["order"] == "reordered"


@pytest.mark.parametrize(
    ("limit", "expected"), [(None, [8, 8]), (8, [8, 8]), (6, [4, 4]), (4, [4, 4])]
)
def test_max_inflight_bounds_microbatches_in_flight_per_direction(limit, expected):
    schedule = build("bitpipe", 8, 64, max_inflight=limit)
    assert max_inflight(schedule) == expected


def test_max_inflight_of_half_d_gives_the_official_order():
    ours = build("bitpipe", 8, 64, max_inflight=4)
    assert ours.programs == build("bitpipe-official", 8, 64).programs
    assert dict(ours.options) == {"max_inflight": 4, "order": "official"}


# --- the steady state with reordered warm-up and cool-down (N >= 4D) -------------------------

REORDERED_GRID = [(d, k * d) for d in (4, 6, 8, 12, 16) for k in (4, 5, 6, 8)]
# idle per rank with F=1, B=2, the same for every N >= 4D (steady state alone: 4D-4 or 4D-8)
REORDERED_IDLE = {4: 6, 6: 9, 8: 15, 12: 24, 16: 34}


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), REORDERED_GRID)
def test_spliced_ends_equal_a_direct_reorder(num_ranks, num_microbatches):
    steady = bitpipe.steady_programs(num_ranks, num_microbatches)
    direct = bitpipe.reorder_ends(num_ranks, steady)
    assert bitpipe.reordered_programs(num_ranks, num_microbatches) == direct


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), REORDERED_GRID)
def test_reordered_order_validates_lowers_and_validates_again(num_ranks, num_microbatches):
    schedule = build("bitpipe", num_ranks, num_microbatches)
    assert dict(schedule.options)["order"] == "reordered"
    lowered = lower(schedule)
    validate(lowered)
    assert lowered.compute_programs() == schedule.programs


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), REORDERED_GRID)
def test_reordered_idle_is_the_pinned_flat_figure(num_ranks, num_microbatches):
    schedule = build("bitpipe", num_ranks, num_microbatches)
    assert idle(schedule) == REORDERED_IDLE[num_ranks]
    assert bitpipe.reordered_ends(num_ranks).idle == REORDERED_IDLE[num_ranks]
    assert idle(schedule) < bitpipe.steady_idle(num_ranks)
    assert idle(schedule) < bitpipe.official_idle(num_ranks, num_microbatches)


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), REORDERED_GRID)
def test_reordered_order_stashes_at_most_2d_and_is_never_slower(num_ranks, num_microbatches):
    ours = simulate(build("bitpipe", num_ranks, num_microbatches), CHUNK_COSTS)
    official = simulate(build("bitpipe-official", num_ranks, num_microbatches), CHUNK_COSTS)
    assert max(ours.peak_activations) <= 2 * num_ranks
    assert ours.makespan < official.makespan


def test_reordered_ends_only_change_the_first_and_last_6d_actions():
    steady = bitpipe.steady_programs(8, 64)
    reordered = bitpipe.reordered_programs(8, 64)
    for before, after in zip(steady, reordered, strict=True):
        assert after[48:-48] == before[48:-48]
        assert sorted(after[:48]) == sorted(before[:48])
        assert sorted(after[-48:]) == sorted(before[-48:])


def test_reordered_ends_at_64_ranks():
    ends = bitpipe.reordered_ends(64)
    assert ends.idle == 143
    assert ends.idle < bitpipe.official_idle(64, 256)


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), [(4, 16), (8, 32)])
def test_max_inflight_below_d_keeps_the_official_order_at_4d(num_ranks, num_microbatches):
    ours = build("bitpipe", num_ranks, num_microbatches, max_inflight=num_ranks - 1)
    assert ours.programs == build("bitpipe-official", num_ranks, num_microbatches).programs
