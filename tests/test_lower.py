"""Lowering derives every message from the compute order, never by hand."""

from megatron_bitpipe.schedules.ir import Kind
from megatron_bitpipe.schedules.lower import lower
from schedule_fixtures import bidirectional_gpipe, one_f_one_b, vshape_gpipe


def texts(program):
    return [str(action) for action in program]


def test_1f1b_middle_rank_receives_just_before_use_and_sends_right_after():
    lowered = lower(one_f_one_b(3, 2))
    assert texts(lowered.programs[1]) == [
        "1RECV_F0", "1F0", "1SEND_F0",
        "1RECV_F1", "1F1", "1SEND_F1",
        "1RECV_B0", "1B0", "1SEND_B0",
        "1RECV_B1", "1B1", "1SEND_B1",
    ]


def test_end_ranks_only_talk_in_one_direction_each():
    lowered = lower(one_f_one_b(2, 1))
    assert texts(lowered.programs[0]) == ["0F0", "0SEND_F0", "0RECV_B0", "0B0"]
    assert texts(lowered.programs[1]) == ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]


def test_v_turn_is_a_local_hand_over_without_messages():
    lowered = lower(vshape_gpipe(2, 1))
    last_rank = texts(lowered.programs[1])
    assert "1SEND_F0" not in last_rank and "2RECV_F0" not in last_rank
    assert "2SEND_B0" not in last_rank and "1RECV_B0" not in last_rank


def test_single_pipeline_gets_no_replica_sync_by_default():
    lowered = lower(one_f_one_b(2, 2))
    assert not any(a.kind is Kind.REDUCE_GRAD for program in lowered.programs for a in program)


def test_bidirectional_ranks_sync_each_of_their_stages_once_after_its_last_backward():
    lowered = lower(bidirectional_gpipe(4, 4))
    for rank, program in enumerate(lowered.programs):
        synced = [a.stage for a in program if a.kind is Kind.REDUCE_GRAD]
        assert sorted(synced) == sorted(lowered.placement.rank_stages[rank])
        for stage in synced:
            last_backward = max(i for i, a in enumerate(program) if a.kind is Kind.B and a.stage == stage)
            assert program.index(next(a for a in program if a.kind is Kind.REDUCE_GRAD and a.stage == stage)) > last_backward


def test_replica_pairs_sync_stages_in_the_same_order():
    lowered = lower(bidirectional_gpipe(4, 8))
    layout = lowered.placement
    order = [
        [layout.position(a.stage) for a in program if a.kind is Kind.REDUCE_GRAD]
        for program in lowered.programs
    ]
    assert order[0] == order[3] and order[1] == order[2]
