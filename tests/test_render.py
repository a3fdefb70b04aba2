"""Renderers show exactly what the schedule and the simulation say, in every format."""

import json
import sys

import pytest

from megatron_bitpipe.schedules import render
from megatron_bitpipe.schedules.ir import Action, Kind, parse_programs
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.simulate import Costs, Event, simulate
from schedule_fixtures import bidirectional_gpipe, one_f_one_b

ONE_F_ONE_B_GRID = """\
time   |   0   1   2   3   4   5   6   7   8  bubble
rank 0 | 0F0 0F1   .   . 0B0 ---   . 0B1 ---   33.3%
rank 1 |   . 1F0 1B0 --- 1F1 1B1 ---   .   .   33.3%
makespan 9, bubble 33.3% over all ranks, 1 column = 1
"""

ONE_F_ONE_B_PROGRAM_GRID = """\
step   |   0   1   2   3
rank 0 | 0F0 0F1 0B0 0B1
rank 1 | 1F0 1B0 1F1 1B1
"""


def synced_result():
    """Bidirectional GPipe at D=2, N=2, lowered, with a replica sync that takes 1."""
    schedule = lower(bidirectional_gpipe(2, 2))
    return schedule, simulate(schedule, Costs(forward=1, backward=2, sync_latency=1))


def test_text_grid_of_1f1b_two_ranks_two_microbatches():
    assert (
        render.text_grid(simulate(one_f_one_b(2, 2), Costs(forward=1, backward=2)))
        == ONE_F_ONE_B_GRID
    )


def test_text_grid_unit_sets_column_width_in_time():
    grid = render.text_grid(simulate(one_f_one_b(2, 2), Costs(forward=1, backward=2)), unit=0.5)
    rank_0 = grid.splitlines()[1].split("|")[1].split()
    assert rank_0[:4] == ["0F0", "---", "0F1", "---"]
    assert len(rank_0) == 18 + 1  # 9 / 0.5 columns, then the bubble


def test_text_grid_adds_a_sync_row_under_each_rank_with_syncs():
    _, result = synced_result()
    lines = render.text_grid(result).splitlines()
    assert lines[2] == "  sync |   .   .   .   .   .   .   .   .   .  3R   .  0R"
    assert lines[4] == "  sync |   .   .   .   .   .   .   .   .   .  1R   .  2R"


def test_program_grid_lists_each_rank_in_order():
    assert render.program_grid(one_f_one_b(2, 2)) == ONE_F_ONE_B_PROGRAM_GRID


def test_program_grid_sizes_each_column_to_its_widest_action():
    lowered = lower(one_f_one_b(2, 2))
    grid = render.program_grid(lowered)
    rows = [line.split("|")[1].split() for line in grid.splitlines()[1:]]
    assert rows == [[str(a) for a in program] for program in lowered.programs]


def test_csv_round_trip_gives_back_the_schedule():
    schedule = one_f_one_b(4, 8)
    text = render.to_csv(schedule)
    back = render.from_csv(
        text,
        name=schedule.name,
        placement=schedule.placement,
        num_microbatches=schedule.num_microbatches,
        microbatch_pipeline=schedule.microbatch_pipeline,
    )
    assert back == schedule


def test_csv_is_one_line_per_rank_without_header():
    text = render.to_csv(one_f_one_b(2, 2))
    assert text == "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n"


def test_from_csv_infers_microbatch_count_and_pipelines():
    schedule = bidirectional_gpipe(2, 4)
    back = render.from_csv(
        render.to_csv(schedule), name=schedule.name, placement=schedule.placement
    )
    assert back.num_microbatches == 4
    assert back.microbatch_pipeline == schedule.microbatch_pipeline
    assert back.programs == schedule.programs


def test_from_csv_rejects_a_row_count_other_than_the_rank_count():
    schedule = one_f_one_b(2, 2)
    with pytest.raises(ValueError, match="3 rows but the looped placement has 2 ranks"):
        render.from_csv(render.to_csv(schedule) + "0F2\n", name="x", placement=schedule.placement)


def test_lowered_csv_round_trips_comm_actions():
    lowered = lower(one_f_one_b(2, 2))
    assert parse_programs(render.to_csv(lowered)) == lowered.programs


def spans(trace):
    return [event for event in trace["traceEvents"] if event["ph"] == "X"]


def test_chrome_trace_has_one_span_per_action_plus_syncs():
    schedule, result = synced_result()
    trace = render.chrome_trace(
        result.events, result.sync_events, name="bi", placement=schedule.placement
    )
    compute = sum(len(program) for program in schedule.compute_programs())
    assert len(result.sync_events) == 4
    assert len(spans(trace)) == compute + 4
    assert json.loads(json.dumps(trace)) == trace


def test_chrome_trace_puts_each_rank_on_its_own_track_and_syncs_on_a_second_thread():
    schedule, result = synced_result()
    trace = render.chrome_trace(result.events, result.sync_events, placement=schedule.placement)
    assert {event["pid"] for event in spans(trace)} == {0, 1}
    sync_spans = [event for event in spans(trace) if event["tid"] == render.SYNC_TID]
    assert len(sync_spans) == 4 and all(
        event["args"]["kind"] == "REDUCE_GRAD" for event in sync_spans
    )
    thread_names = {
        (event["pid"], event["tid"]): event["args"]["name"]
        for event in trace["traceEvents"]
        if event["name"] == "thread_name"
    }
    assert thread_names[(0, render.SYNC_TID)] == "grad sync"
    assert thread_names[(1, render.COMPUTE_TID)] == "compute"


def test_chrome_trace_names_and_args_describe_the_action():
    schedule, result = synced_result()
    trace = render.chrome_trace(result.events, placement=schedule.placement)
    up_forward = next(e for e in spans(trace) if e["args"]["action"] == "2F1")
    assert up_forward["name"] == "F mb1 stage2"
    assert up_forward["pid"] == schedule.placement.rank_of(2)
    assert up_forward["args"] == {
        "rank": schedule.placement.rank_of(2),
        "stage": 2,
        "microbatch": 1,
        "kind": "F",
        "action": "2F1",
        "chunk": schedule.placement.chunk_of(2),
        "pipeline": "up",
    }
    assert up_forward["cname"] == render.TRACE_COLOURS[Kind.F]


def test_chrome_trace_scales_seconds_to_microseconds():
    result = simulate(one_f_one_b(2, 1), Costs(forward=0.25, backward=0.5))
    trace = render.chrome_trace(result.events, time_unit=render.SECONDS)
    backward = next(event for event in spans(trace) if event["args"]["action"] == "1B0")
    assert backward["ts"] == pytest.approx(0.5e6)
    assert backward["dur"] == pytest.approx(0.5e6)


def test_chrome_trace_takes_measured_comm_events():
    events = [Event(0, Action.parse("1SEND_F0"), 1.0, 1.5)]
    (span,) = spans(render.chrome_trace(events))
    assert span["name"] == "SEND_F mb0 stage1"
    assert span["cname"] == render.COMM_COLOUR


def test_write_chrome_trace_writes_loadable_json(tmp_path):
    result = simulate(one_f_one_b(2, 2))
    path = tmp_path / "trace.json"
    render.write_chrome_trace(path, result.events, name="1f1b")
    assert len(spans(json.loads(path.read_text()))) == 8


def test_plot_png_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    schedule, result = synced_result()
    path = tmp_path / "schedule.png"
    render.plot_png(result, path, title="bi-gpipe", placement=schedule.placement)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_plot_png_without_matplotlib_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="plot_png needs matplotlib"):
        render.plot_png(simulate(one_f_one_b(2, 2)), tmp_path / "x.png")
