"""V-Min, V-Half and V-ZB (arXiv 2405.15362) on the V placement.

The figures are the zero-bubble fork's, as measured from it:
  * peak memory in chunk activations, +1 at F and -1 at W (``simulate``'s count);
  * bubble with F = I = W = 1 and no communication time, the fork's way: the longest rank span
    (first start to last end) minus one rank's busy time. It leaves out the start skew, since
    iterations tile. One rank's F+B+W of one microbatch is 6 slots; the figures are in those units.
"""

from __future__ import annotations

import pytest

from megatron_bitpipe.schedules import (
    ScheduleConfigError,
    build,
    lower,
    validate,
    vshape,
    vshape_zb,
)
from megatron_bitpipe.schedules.ir import Kind, Schedule
from megatron_bitpipe.schedules.simulate import Costs, SimResult, simulate

NAMES = ("v-min", "v-half", "v-zb")
GRID = [(d, n) for d in (2, 4, 8) for n in (2 * d, 4 * d)]
UNIT = Costs(forward=1, input_grad=1, weight_grad=1)
SLOTS_PER_UNIT = 6

PEAK_FORMULA = {
    "v-min": lambda d: 2 * ((d + 4) // 3),
    "v-half": lambda d: 2 * ((d + 2) // 2),
    "v-zb": lambda d: 2 * d,
}

# the fork's bubble table x 6 (D=4: 1.83 / 0.83 / 0, D=8: 4.5 / 2.83 / 0); D=2 is our measurement
SPAN_BUBBLE_SLOTS = {
    ("v-min", 2): 3,
    ("v-min", 4): 11,
    ("v-min", 8): 27,
    ("v-half", 2): 1,
    ("v-half", 4): 5,
    ("v-half", 8): 17,
    ("v-zb", 2): 0,
    ("v-zb", 4): 0,
    ("v-zb", 8): 0,
}


def spans(result: SimResult) -> list[float]:
    """Each rank's first start to last end."""
    return [
        max(e.end for e in result.events if e.rank == rank)
        - min(e.start for e in result.events if e.rank == rank)
        for rank in range(len(result.busy))
    ]


def span_bubble(result: SimResult) -> float:
    """The fork's bubble: the longest rank span minus one rank's busy time (all ranks are equal)."""
    assert len(set(result.busy)) == 1
    return max(spans(result)) - result.busy[0]


# --- valid, before and after lowering ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_builds_and_lowers_to_a_valid_schedule(name, num_ranks, num_microbatches):
    schedule = build(name, num_ranks, num_microbatches)
    assert schedule.placement.kind == "vshape"
    validate(lower(schedule))


@pytest.mark.parametrize("name", ["v-min", "v-half"])
@pytest.mark.parametrize("num_ranks, num_microbatches", [(2, 2), (4, 4), (8, 8), (4, 1), (8, 3)])
def test_v_min_and_v_half_take_as_few_microbatches_as_they_are_given(
    name, num_ranks, num_microbatches
):
    validate(lower(build(name, num_ranks, num_microbatches)))


@pytest.mark.parametrize("name", NAMES)
def test_a_single_rank_holds_both_legs(name):
    validate(lower(build(name, 1, 3)))


@pytest.mark.parametrize("name", NAMES)
def test_backward_is_split_into_input_and_weight_gradients(name):
    kinds = {action.kind for program in build(name, 4, 8).programs for action in program}
    assert kinds == {Kind.F, Kind.I, Kind.W}


# --- the V turn ------------------------------------------------------------------------------


def turn_messages(schedule: Schedule, num_ranks: int) -> list[str]:
    """Communication actions that would carry the turn D-1 -> D (forward) or D -> D-1 (backward)."""
    turn = {
        (Kind.SEND_F, num_ranks - 1),
        (Kind.RECV_F, num_ranks),
        (Kind.SEND_B, num_ranks),
        (Kind.RECV_B, num_ranks - 1),
    }
    return [
        str(action)
        for program in schedule.programs
        for action in program
        if (action.kind, action.stage) in turn
    ]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_the_v_turn_sends_no_message_after_lower(name, num_ranks):
    lowered = lower(build(name, num_ranks, 2 * num_ranks))
    assert turn_messages(lowered, num_ranks) == []


@pytest.mark.parametrize("name", NAMES)
def test_every_other_stage_boundary_is_one_message_each_way(name):
    num_ranks, num_microbatches = 4, 8
    result = simulate(build(name, num_ranks, num_microbatches))
    assert result.p2p_messages == 2 * (2 * num_ranks - 2) * num_microbatches


# --- memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_peak_activations_match_the_papers_formula(name, num_ranks, num_microbatches):
    peaks = simulate(build(name, num_ranks, num_microbatches), UNIT).peak_activations
    assert max(peaks) == PEAK_FORMULA[name](num_ranks)


@pytest.mark.parametrize("name", ["v-min", "v-half"])
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_peak_activations_hold_with_as_many_microbatches_as_ranks(name, num_ranks):
    peaks = simulate(build(name, num_ranks, num_ranks), UNIT).peak_activations
    assert max(peaks) == PEAK_FORMULA[name](num_ranks)


def test_v_min_and_v_half_hold_a_third_and_a_half_of_1f1b_at_d8():
    one_f_one_b = 2 * 8
    peaks = {name: max(simulate(build(name, 8, 32)).peak_activations) for name in NAMES}
    assert peaks == {"v-min": 8, "v-half": 10, "v-zb": one_f_one_b}


# --- bubble -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_span_bubble_matches_the_forks_table(name, num_ranks, num_microbatches):
    result = simulate(build(name, num_ranks, num_microbatches), UNIT)
    assert span_bubble(result) == SPAN_BUBBLE_SLOTS[(name, num_ranks)]


@pytest.mark.parametrize("name", ["v-min", "v-half"])
@pytest.mark.parametrize("num_ranks", [4, 8])
def test_span_bubble_is_already_steady_with_as_many_microbatches_as_ranks(name, num_ranks):
    result = simulate(build(name, num_ranks, num_ranks), UNIT)
    assert span_bubble(result) == SPAN_BUBBLE_SLOTS[(name, num_ranks)]


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("extra", [-1, 0, 5])
def test_v_zb_never_idles_inside_a_rank_span(num_ranks, extra):
    result = simulate(build("v-zb", num_ranks, 2 * num_ranks + extra), UNIT)
    assert spans(result) == list(result.busy)


@pytest.mark.parametrize("num_ranks, num_microbatches", GRID)
def test_v_zb_makespan_is_busy_time_plus_the_start_skew(num_ranks, num_microbatches):
    result = simulate(build("v-zb", num_ranks, num_microbatches), UNIT)
    busy = SLOTS_PER_UNIT * num_microbatches
    assert result.makespan == busy + num_ranks - 1


# --- orders against the fork (D=4, m=8) -------------------------------------------------------

# upper case: the rank's down-leg stage r; lower case: its up-leg stage 7-r; B/b the input grad
NOTE_D4_M8 = {
    "v-min": [
        "F0 F1 F2 f0 b0 w0 f1 b1 w1 B0 W0 F3 f2 b2 B1 w2 W1 F4 f3 b3 B2 w3 W2 F5 f4 b4 B3 w4 W3 "
        "F6 f5 b5 B4 w5 W4 F7 f6 b6 B5 w6 W5 f7 b7 B6 w7 W6 B7 W7",
        "F0 F1 f0 f1 b0 w0 F2 B0 b1 w1 W0 f2 F3 B1 b2 w2 W1 f3 F4 B2 b3 w3 W2 f4 F5 B3 b4 w4 W3 "
        "f5 F6 B4 b5 w5 W4 f6 F7 B5 b6 w6 W5 f7 B6 b7 w7 W6 B7 W7",
        "F0 F1 f0 f1 b0 w0 F2 B0 W0 b1 f2 w1 B1 F3 W1 b2 f3 w2 B2 F4 W2 b3 f4 w3 B3 F5 W3 b4 f5 "
        "w4 B4 F6 W4 b5 f6 w5 B5 F7 W5 b6 f7 w6 B6 W6 b7 w7 B7 W7",
        "F0 f0 F1 f1 b0 B0 w0 W0 F2 f2 b1 B1 w1 W1 F3 f3 b2 B2 w2 W2 F4 f4 b3 B3 w3 W3 F5 f5 b4 "
        "B4 w4 W4 F6 f6 b5 B5 w5 W5 F7 f7 b6 B6 w6 W6 b7 B7 w7 W7",
    ],
    "v-zb": [
        "F0 F1 F2 F3 F4 F5 F6 f0 b0 w0 f1 b1 w1 f2 b2 w2 f3 b3 w3 F7 B0 W0 f4 b4 w4 B1 W1 f5 b5 "
        "w5 B2 W2 f6 b6 w6 B3 W3 f7 b7 B4 w7 W4 B5 W5 B6 W6 B7 W7",
        "F0 F1 F2 F3 F4 f0 F5 f1 b0 w0 f2 b1 w1 f3 b2 w2 F6 B0 W0 f4 b3 w3 F7 B1 W1 f5 b4 w4 B2 "
        "W2 f6 b5 w5 B3 W3 f7 b6 B4 b7 B5 w6 W4 B6 w7 B7 W5 W6 W7",
        "F0 F1 F2 f0 F3 f1 F4 f2 b0 w0 f3 b1 w1 F5 B0 W0 f4 b2 w2 F6 B1 W1 f5 b3 w3 F7 B2 W2 f6 "
        "b4 w4 B3 W3 f7 b5 B4 b6 B5 b7 B6 w5 B7 W4 w6 W5 w7 W6 W7",
        "F0 f0 F1 f1 F2 f2 F3 f3 b0 w0 F4 B0 W0 f4 b1 w1 F5 B1 W1 f5 b2 w2 F6 B2 W2 f6 b3 w3 F7 "
        "B3 W3 f7 b4 B4 b5 B5 b6 B6 b7 B7 w4 W4 w5 W5 w6 W6 w7 W7",
    ],
}


def note_actions(rank: int, row: str, num_ranks: int = 4) -> list[str]:
    """The fork's ``F0 f0 b0 w0`` for ``rank`` in our text form (``0F0 7F0 7I0 7W0``)."""
    actions = []
    for op in row.split():
        stage = rank if op[0].isupper() else 2 * num_ranks - 1 - rank
        kind = {"f": "F", "b": "I", "w": "W"}[op[0].lower()]
        actions.append(f"{stage}{kind}{op[1:]}")
    return actions


def compute_order(actions: list[str]) -> list[str]:
    return [action for action in actions if "W" not in action]


@pytest.mark.parametrize("name", sorted(NOTE_D4_M8))
@pytest.mark.parametrize("rank", range(4))
def test_forward_and_input_grad_order_matches_the_fork_for_d4_m8(name, rank):
    # where W runs may differ (the fork queues W per chunk, we oldest first); peak and bubble
    # are pinned above
    ours = [str(action) for action in build(name, 4, 8).programs[rank]]
    expected = note_actions(rank, NOTE_D4_M8[name][rank])
    assert compute_order(ours) == compute_order(expected)


@pytest.mark.parametrize("rank", [2, 3])
def test_v_zb_order_matches_the_fork_for_d4_m8_including_w(rank):
    ours = [str(action) for action in build("v-zb", 4, 8).programs[rank]]
    assert ours == note_actions(rank, NOTE_D4_M8["v-zb"][rank])


# --- bad settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_ranks, num_microbatches", [(2, 2), (4, 6), (8, 8)])
def test_v_zb_rejects_fewer_than_2d_minus_1_microbatches(num_ranks, num_microbatches):
    with pytest.raises(ScheduleConfigError) as error:
        build("v-zb", num_ranks, num_microbatches)
    message = str(error.value)
    assert "v-zb" in message and "--microbatches" in message and "--pp" in message


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_v_zb_accepts_2d_minus_1_microbatches(num_ranks):
    validate(lower(build("v-zb", num_ranks, 2 * num_ranks - 1)))


# --- the fast paths plan what the slot-by-slot plan does --------------------------------------


@pytest.mark.parametrize("name", ["v-min", "v-half"])
@pytest.mark.parametrize("num_ranks, num_microbatches", [(3, 6), (4, 20), (7, 14), (8, 41)])
def test_reorder_windows_and_skipped_steady_state_plan_as_one_window(
    name, num_ranks, num_microbatches, monkeypatch
):
    generate = {"v-min": vshape.generate_v_min, "v-half": vshape.generate_v_half}[name]
    fast = generate(num_ranks, num_microbatches).programs
    plan_init = vshape._RepeatedPlan.__init__

    def one_window(plan, *args):
        plan_init(plan, *args)
        plan.cooldown_start = -1  # below the steady start: one window, nothing skipped

    monkeypatch.setattr(vshape._RepeatedPlan, "__init__", one_window)
    assert generate(num_ranks, num_microbatches).programs == fast


@pytest.mark.parametrize("num_ranks, num_microbatches", [(2, 9), (4, 7), (4, 30), (8, 45)])
def test_v_zb_skipped_steady_periods_run_as_step_by_step(num_ranks, num_microbatches, monkeypatch):
    fast = vshape.generate_v_zb(num_ranks, num_microbatches).programs
    monkeypatch.setattr(vshape_zb, "_zb_steady_periods", lambda *args: 0)
    assert vshape.generate_v_zb(num_ranks, num_microbatches).programs == fast
