"""Zero-bubble BitPipe and the weight-gradient fill behind it."""

from __future__ import annotations

import pytest

from megatron_bitpipe.schedules import bitpipe
from megatron_bitpipe.schedules.ir import Action, Kind
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.placement import looped
from megatron_bitpipe.schedules.registry import build
from megatron_bitpipe.schedules.simulate import Costs, simulate
from megatron_bitpipe.schedules.validate import validate
from megatron_bitpipe.schedules.weight_fill import fill, split

GRID = [(d, k * d) for d in (2, 4, 8, 16) for k in (1, 2, 4, 8)]
UNIT = Costs(forward=1.0, backward=2.0, input_grad=1.0, weight_grad=1.0)


def idle(schedule) -> float:
    result = simulate(schedule, UNIT)
    return result.makespan - max(result.busy)


@pytest.mark.parametrize("num_ranks,num_microbatches", GRID)
def test_bitpipe_zb_idles_only_while_its_middle_rank_waits_for_its_first_input(num_ranks, num_microbatches):
    """D/2 - 1 units: rank D/2 - 1 gets its first input then; no W exists yet to fill that."""
    assert idle(build("bitpipe-zb", num_ranks, num_microbatches)) == num_ranks // 2 - 1


@pytest.mark.parametrize("num_ranks,num_microbatches", GRID)
def test_bitpipe_zb_stashes_at_most_2d_chunk_activations(num_ranks, num_microbatches):
    peaks = simulate(build("bitpipe-zb", num_ranks, num_microbatches)).peak_activations
    assert max(peaks) <= 2 * num_ranks


@pytest.mark.parametrize("num_ranks,num_microbatches", [(d, n) for d, n in GRID if d >= 4])
def test_bitpipe_zb_idles_less_than_bitpipe_at_the_same_backward_cost(num_ranks, num_microbatches):
    assert idle(build("bitpipe-zb", num_ranks, num_microbatches)) < idle(build("bitpipe", num_ranks, num_microbatches))


@pytest.mark.parametrize("num_ranks,num_microbatches", [(4, 8), (8, 32)])
def test_bitpipe_zb_keeps_the_official_forward_and_input_gradient_order(num_ranks, num_microbatches):
    official = bitpipe.official_programs(num_ranks, num_microbatches)
    for rank, program in enumerate(build("bitpipe-zb", num_ranks, num_microbatches).programs):
        kept = [action for action in program if action.kind is not Kind.W]
        assert kept == [a._replace(kind=Kind.I) if a.kind is Kind.B else a for a in official[rank]]


@pytest.mark.parametrize("num_ranks,num_microbatches", [(2, 4), (4, 16), (8, 16)])
def test_bitpipe_zb_validates_lowers_and_validates_again(num_ranks, num_microbatches):
    validate(lower(build("bitpipe-zb", num_ranks, num_microbatches)))


def test_split_puts_each_w_right_after_its_i():
    program = (Action(0, Kind.F, 0), Action(0, Kind.B, 0))
    assert [str(a) for a in split(program)] == ["0F0", "0I0", "0W0"]


def test_fill_runs_a_pending_w_where_the_rank_would_wait():
    """1F1B at D=2, N=2 (F=I=W=1): rank 0 waits for the gradient of microbatch 0 after F1, where
    no W is pending yet, then for that of microbatch 1 after I0, which W0 fills; rank 1 never
    waits, so its Ws run last."""
    programs = [
        [Action(0, Kind.F, 0), Action(0, Kind.F, 1), Action(0, Kind.B, 0), Action(0, Kind.B, 1)],
        [Action(1, Kind.F, 0), Action(1, Kind.B, 0), Action(1, Kind.F, 1), Action(1, Kind.B, 1)],
    ]
    filled = fill(looped(2), programs, 2, cap=4)
    assert [str(a) for a in filled[0]] == ["0F0", "0F1", "0I0", "0W0", "0I1", "0W1"]
    assert [str(a) for a in filled[1]] == ["1F0", "1I0", "1F1", "1I1", "1W0", "1W1"]


def test_fill_runs_a_pending_w_before_a_forward_past_the_cap():
    programs = [[Action(0, Kind.F, 0), Action(0, Kind.B, 0), Action(0, Kind.F, 1), Action(0, Kind.B, 1)]]
    assert [str(a) for a in fill(looped(1), programs, 2, cap=1)[0]] == ["0F0", "0I0", "0W0", "0F1", "0I1", "0W1"]
    assert [str(a) for a in fill(looped(1), programs, 2, cap=2)[0]] == ["0F0", "0I0", "0F1", "0I1", "0W0", "0W1"]
