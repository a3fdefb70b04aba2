"""The simulator reproduces closed forms on schedules whose timing is known by hand."""

import pytest

from megatron_bitpipe.schedules.errors import ScheduleError
from megatron_bitpipe.schedules.ir import B, F
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.simulate import Costs, ModelDims, peak_activations, simulate
from schedule_fixtures import bidirectional_gpipe, one_f_one_b, vshape_gpipe


@pytest.mark.parametrize("num_ranks,num_microbatches", [(2, 2), (4, 8), (8, 32)])
def test_1f1b_bubble_matches_closed_form_for_equal_forward_and_backward(num_ranks, num_microbatches):
    result = simulate(one_f_one_b(num_ranks, num_microbatches), Costs(forward=1, backward=1))
    assert result.bubble_ratio == pytest.approx((num_ranks - 1) / (num_microbatches + num_ranks - 1))


def test_1f1b_makespan_with_backward_twice_forward():
    result = simulate(one_f_one_b(4, 8), Costs(forward=1, backward=2))
    assert result.makespan == (8 + 4 - 1) * 3


def test_1f1b_stashes_d_minus_rank_activations():
    assert peak_activations(one_f_one_b(4, 8)) == (4, 3, 2, 1)


def test_latency_delays_every_cross_rank_hop():
    fast = simulate(one_f_one_b(2, 1), Costs(forward=1, backward=1))
    slow = simulate(one_f_one_b(2, 1), Costs(forward=1, backward=1, latency=0.5))
    assert slow.makespan - fast.makespan == pytest.approx(1.0)


def test_v_turn_costs_no_latency():
    hops = 2 * (2 * 2 - 2)  # 2D-2 cross-rank hops, forward and backward
    fast = simulate(vshape_gpipe(2, 1), Costs(forward=1, backward=1))
    slow = simulate(vshape_gpipe(2, 1), Costs(forward=1, backward=1, latency=1.0))
    assert slow.makespan - fast.makespan == pytest.approx(hops)


def test_message_bytes_follow_model_dims():
    dims = ModelDims(num_layers=8, hidden_size=64, num_attention_heads=4, seq_length=32, micro_batch_size=2)
    result = simulate(one_f_one_b(4, 4), dims=dims)
    assert result.p2p_messages == 2 * 4 * 3
    assert result.p2p_bytes == result.p2p_messages * 32 * 2 * 64 * 2
    assert result.peak_activation_bytes[0] == 4 * 2 * dims.layer_activation_bytes()


def test_replica_sync_ends_the_step_when_it_is_not_hidden():
    lowered = lower(bidirectional_gpipe(2, 2))
    plain = simulate(lowered, Costs(forward=1, backward=1))
    slow_sync = simulate(lowered, Costs(forward=1, backward=1, sync_latency=100))
    assert slow_sync.makespan >= plain.makespan + 100
    assert len(slow_sync.sync_events) == 4


def test_simulating_a_deadlocked_schedule_raises():
    schedule = one_f_one_b(2, 1)
    broken = schedule.with_programs(((B(0, 0), F(0, 0)), schedule.programs[1]))
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(broken)


def test_stage_extra_costs_apply_to_first_and_last_positions():
    costs = Costs(forward=1, backward=1, stage_extra={0: (1.0, 0.0), -1: (0.0, 2.0)})
    result = simulate(one_f_one_b(2, 1), costs)
    assert result.makespan == 2 + 1 + 1 + 2 + 1
