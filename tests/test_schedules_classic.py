"""The single-direction classic schedules: GPipe, 1F1B, interleaved 1F1B, breadth-first, ZB-H1.

Pure Python except the last section, which checks our orders against torch.distributed.pipelining's
validator and LoopedBFS, and against megatron-core's own interleaving tables (skipped without them).
"""

from __future__ import annotations

import types

import pytest

from megatron_bitpipe.schedules import ScheduleConfigError, build, lower, validate
from megatron_bitpipe.schedules.ir import Schedule, parse_programs
from megatron_bitpipe.schedules.one_f_one_b import schedule_table
from megatron_bitpipe.schedules.simulate import Costs, simulate

SCHEDULES = [
    ("gpipe", {}),
    ("1f1b", {}),
    ("interleaved-1f1b", {"vp": 2}),
    ("breadth-first", {"vp": 2}),
    ("zb-h1", {}),
]
GRID = [(d, n) for d in (2, 4, 8) for n in (d, 2 * d, 4 * d)]
EQUAL_COSTS = Costs(forward=1.0, backward=1.0)


def programs_text(schedule: Schedule, rank: int) -> str:
    return " ".join(str(action) for action in schedule.programs[rank])


# --- every schedule is valid ---------------------------------------------------------------


@pytest.mark.parametrize("name, options", SCHEDULES)
@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_builds_and_lowers_to_a_valid_schedule(name, options, num_ranks, num_microbatches):
    schedule = build(name, num_ranks, num_microbatches, **options)
    validate(lower(schedule))


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
@pytest.mark.parametrize("num_ranks, num_microbatches", [(4, 1), (4, 3), (8, 5), (1, 3)])
def test_fewer_microbatches_than_ranks_caps_the_warmup(name, num_ranks, num_microbatches):
    validate(lower(build(name, num_ranks, num_microbatches)))


def test_interleaved_accepts_a_last_group_of_at_least_pp_microbatches():
    validate(lower(build("interleaved-1f1b", 2, 5, vp=2, microbatch_group_size=3)))


# --- bubbles and memory against closed forms -------------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_single_chunk_bubble_is_d_minus_1_over_n_plus_d_minus_1(name, num_ranks, num_microbatches):
    result = simulate(build(name, num_ranks, num_microbatches), EQUAL_COSTS)
    expected = (num_ranks - 1) / (num_microbatches + num_ranks - 1)
    assert result.bubble_ratio == pytest.approx(expected)


@pytest.mark.parametrize("name", ["interleaved-1f1b", "breadth-first"])
@pytest.mark.parametrize("vp", [2, 3])
@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_looped_bubble_is_d_minus_1_over_vn_plus_d_minus_1(name, vp, num_ranks, num_microbatches):
    result = simulate(build(name, num_ranks, num_microbatches, vp=vp), EQUAL_COSTS)
    expected = (num_ranks - 1) / (vp * num_microbatches + num_ranks - 1)
    assert result.bubble_ratio == pytest.approx(expected)


@pytest.mark.parametrize(
    "forward, input_grad, weight_grad", [(1, 1, 1), (2, 2, 1), (1, 2, 1), (1, 1, 0.5)]
)
@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_zb_h1_idle_per_rank_is_d_minus_1_times_f_plus_i_minus_w(
    forward, input_grad, weight_grad, num_ranks, num_microbatches
):
    costs = Costs(
        forward=forward,
        backward=input_grad + weight_grad,
        input_grad=input_grad,
        weight_grad=weight_grad,
    )
    result = simulate(build("zb-h1", num_ranks, num_microbatches), costs)
    expected = (num_ranks - 1) * (forward + input_grad - weight_grad)
    assert result.idle == pytest.approx((expected,) * num_ranks)


@pytest.mark.parametrize("num_ranks, num_microbatches", GRID + [(4, 3), (8, 5)])
def test_1f1b_rank0_holds_min_d_n_activations(num_ranks, num_microbatches):
    peaks = simulate(build("1f1b", num_ranks, num_microbatches)).peak_activations
    assert peaks[0] == min(num_ranks, num_microbatches)


@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_gpipe_holds_all_n_activations(num_ranks, num_microbatches):
    peaks = simulate(build("gpipe", num_ranks, num_microbatches)).peak_activations
    assert peaks == (num_microbatches,) * num_ranks


@pytest.mark.parametrize("num_ranks, num_microbatches", GRID + [(4, 3)])
def test_zb_h1_never_holds_more_than_1f1b_rank0(num_ranks, num_microbatches):
    peaks = simulate(build("zb-h1", num_ranks, num_microbatches)).peak_activations
    assert max(peaks) == min(num_ranks, num_microbatches)


@pytest.mark.parametrize("num_ranks, vp", [(2, 2), (4, 2), (8, 2), (4, 3)])
def test_interleaved_rank0_peak_is_megatron_warmup_plus_one(num_ranks, vp):
    peaks = simulate(build("interleaved-1f1b", num_ranks, 4 * num_ranks, vp=vp)).peak_activations
    assert peaks[0] == 2 * (num_ranks - 1) + (vp - 1) * num_ranks + 1


# --- pinned op orders (reference implementations) --------------------------------------------


def test_1f1b_rank0_order_for_d4_n8():
    schedule = build("1f1b", 4, 8)
    expected = "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7"
    assert programs_text(schedule, 0) == expected


def test_interleaved_rank0_order_depth_first_group_4():
    # a pinned reference prefix; the tail follows megatron's cool-down
    schedule = build("interleaved-1f1b", 4, 8, vp=2, microbatch_group_size=4)
    expected = (
        "0F0 0F1 0F2 0F3 4F0 4F1 4F2 4F3 0F4 0F5 0F6 4B0 0F7 4B1 4F4 4B2 4F5 4B3 4F6 0B0 4F7 0B1 "
        "0B2 0B3 4B4 4B5 4B6 4B7 0B4 0B5 0B6 0B7"
    )
    assert programs_text(schedule, 0) == expected


def test_interleaved_rank0_order_breadth_first_group_8():
    schedule = build("interleaved-1f1b", 4, 8, vp=2, microbatch_group_size=8)
    forwards = " ".join([f"0F{m}" for m in range(8)] + [f"4F{m}" for m in range(6)])
    backwards = " ".join([f"4B{m}" for m in range(2, 8)] + [f"0B{m}" for m in range(8)])
    assert programs_text(schedule, 0) == f"{forwards} 4F6 4B0 4F7 4B1 {backwards}"


def test_interleaved_default_group_is_pp():
    default = build("interleaved-1f1b", 4, 16, vp=2)
    explicit = build("interleaved-1f1b", 4, 16, vp=2, microbatch_group_size=4)
    assert default.programs == explicit.programs


def test_schedule_table_matches_megatron_docstring_example():
    # megatron-core docstring (PP2 VP2 group 3, M=5)
    table = schedule_table(5, 2, 3)
    assert [m for m, _ in table] == [0, 1, 2, 0, 1, 2, 3, 4, 3, 4]
    assert [c for _, c in table] == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]


def test_breadth_first_rank0_order_for_d4_vp2_n8():
    schedule = build("breadth-first", 4, 8, vp=2)
    expected = (
        [f"0F{m}" for m in range(8)]
        + [f"4F{m}" for m in range(8)]
        + [f"4B{m}" for m in reversed(range(8))]
        + [f"0B{m}" for m in reversed(range(8))]
    )
    assert programs_text(schedule, 0) == " ".join(expected)


ZB_H1_D4_M8 = [
    "F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 B5 W5 B6 W6 B7 W7",
    "F0 F1 F2 B0 F3 B1 W0 F4 B2 W1 F5 B3 W2 F6 B4 W3 F7 B5 W4 B6 W5 B7 W6 W7",
    "F0 F1 B0 F2 B1 F3 B2 W0 F4 B3 W1 F5 B4 W2 F6 B5 W3 F7 B6 W4 B7 W5 W6 W7",
    "F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 F6 B6 W3 F7 B7 W4 W5 W6 W7",
]


@pytest.mark.parametrize("rank", range(4))
def test_zb_h1_order_matches_the_zero_bubble_fork_for_d4_m8(rank):
    # the fork writes the input-gradient backward as B; ours is I
    expected = " ".join(
        f"{rank}{'I' if op[0] == 'B' else op[0]}{op[1:]}" for op in ZB_H1_D4_M8[rank].split()
    )
    assert programs_text(build("zb-h1", 4, 8), rank) == expected


# --- bad settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, num_ranks, num_microbatches, options, settings",
    [
        ("interleaved-1f1b", 4, 8, {"vp": 1}, ["--vp"]),
        ("interleaved-1f1b", 1, 8, {}, ["--pp"]),
        ("interleaved-1f1b", 4, 2, {}, ["--microbatches", "--pp"]),
        ("interleaved-1f1b", 4, 8, {"microbatch_group_size": 3}, ["--microbatch-group-size"]),
        ("interleaved-1f1b", 4, 8, {"microbatch_group_size": 9}, ["--microbatch-group-size"]),
        ("interleaved-1f1b", 4, 10, {}, ["--microbatches", "--microbatch-group-size"]),
        ("breadth-first", 4, 3, {}, ["--microbatches", "--pp"]),
        ("breadth-first", 4, 8, {"vp": 0}, ["--vp"]),
        ("gpipe", 4, 0, {}, ["--microbatches"]),
        ("1f1b", 0, 4, {}, ["--pp"]),
        ("zb-h1", 4, 8, {"vp": 2}, ["vp"]),
    ],
)
def test_bad_settings_are_rejected_naming_the_setting(
    name, num_ranks, num_microbatches, options, settings
):
    with pytest.raises(ScheduleConfigError) as error:
        build(name, num_ranks, num_microbatches, **options)
    message = str(error.value)
    assert message.startswith(name)
    for setting in settings:
        assert setting in message


# --- against torch.distributed.pipelining and megatron-core -----------------------------------


def test_csv_round_trips_through_parse_programs():
    schedule = build("zb-h1", 4, 8)
    assert parse_programs(schedule.to_csv()) == schedule.programs


@pytest.mark.parametrize("num_ranks, num_microbatches, vp", [(2, 4, 2), (4, 8, 2), (4, 12, 3)])
def test_breadth_first_equals_torch_looped_bfs(num_ranks, num_microbatches, vp):
    torch_schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    looped_bfs = types.SimpleNamespace(
        _stages=[None] * vp, pp_group_size=num_ranks, _n_microbatches=num_microbatches
    )
    schedule = build("breadth-first", num_ranks, num_microbatches, vp=vp)
    for rank in range(num_ranks):
        ops = torch_schedules.ScheduleLoopedBFS._calculate_single_rank_operations(looped_bfs, rank)
        assert programs_text(schedule, rank) == " ".join(str(op) for op in ops if op is not None)


def megatron_order(num_ranks, rank, num_microbatches, vp, group):
    """Replay megatron-core's interleaved loop from its own tables and warm-up count."""
    mcore = pytest.importorskip("megatron.core.pipeline_parallel.schedules")
    p2p = types.SimpleNamespace(
        pp_group=types.SimpleNamespace(size=lambda: num_ranks, rank=lambda: rank),
        virtual_pipeline_model_parallel_size=vp,
    )
    total, _, num_warmup, num_steady = mcore.get_pp_rank_microbatches(
        num_microbatches, vp, group, p2p_communicator=p2p
    )
    table = mcore.get_schedule_table(num_microbatches, vp, group)
    done_backwards = [0] * vp

    def forward(k):
        microbatch, chunk = table[k]
        return f"{chunk * num_ranks + rank}F{microbatch}"

    def backward(k):
        chunk = vp - 1 - table[k][1]
        microbatch = done_backwards[chunk]  # megatron pops each chunk's stash in FIFO order
        done_backwards[chunk] += 1
        return f"{chunk * num_ranks + rank}B{microbatch}"

    order = [forward(k) for k in range(num_warmup)]
    for k in range(num_steady):
        order += [forward(num_warmup + k), backward(k)]
    order += [backward(k) for k in range(num_steady, total)]
    return " ".join(order)


@pytest.mark.parametrize(
    "num_ranks, num_microbatches, vp, group",
    [(4, 8, 2, 4), (4, 8, 2, 8), (4, 16, 3, 4), (2, 5, 2, 3), (8, 16, 2, 8), (4, 14, 2, 5)],
)
def test_interleaved_equals_megatron_core_replay(num_ranks, num_microbatches, vp, group):
    schedule = build(
        "interleaved-1f1b", num_ranks, num_microbatches, vp=vp, microbatch_group_size=group
    )
    for rank in range(num_ranks):
        expected = megatron_order(num_ranks, rank, num_microbatches, vp, group)
        assert programs_text(schedule, rank) == expected
