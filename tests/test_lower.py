"""Lowering derives every message from the compute order, never by hand."""

from megatron_bitpipe.schedules import build, names
from megatron_bitpipe.schedules.ir import Action, Kind
from megatron_bitpipe.schedules.lower import lower, send_completions
from schedule_fixtures import bidirectional_gpipe, one_f_one_b, vshape_gpipe


def texts(program):
    return [str(action) for action in program]


def test_1f1b_middle_rank_receives_when_the_peer_sends_and_sends_right_after():
    lowered = lower(one_f_one_b(3, 2))
    # rank 0 sends F1 as rank 1 finishes F0: the lower rank's message comes first at that moment
    assert texts(lowered.programs[1]) == [
        "1RECV_F0", "1F0", "1RECV_F1", "1SEND_F0",
        "1F1", "1SEND_F1",
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


def test_a_send_completes_at_the_first_reply_the_peer_sent_after_posting_its_receive():
    lowered = lower(one_f_one_b(4, 8))
    completions = send_completions(lowered)
    # rank 0 sends F0..F3 in warm-up; rank 1 posts the receive of F3 before it sends B0 back
    assert {str(recv): texts(sends) for recv, sends in completions[0].items()} == {
        "0RECV_B0": ["0SEND_F0", "0SEND_F1", "0SEND_F2", "0SEND_F3"],
        "0RECV_B1": ["0SEND_F4"],
        "0RECV_B2": ["0SEND_F5"],
        "0RECV_B3": ["0SEND_F6"],
        "0RECV_B4": ["0SEND_F7"],
    }
    # the last rank's gradients are proven by activations the middle rank sends later
    assert {str(recv): texts(sends) for recv, sends in completions[3].items()} == {
        "3RECV_F2": ["3SEND_B0"],
        "3RECV_F3": ["3SEND_B1"],
        "3RECV_F4": ["3SEND_B2"],
        "3RECV_F5": ["3SEND_B3"],
        "3RECV_F6": ["3SEND_B4"],
        "3RECV_F7": ["3SEND_B5"],
    }


def test_every_completion_comes_after_its_send_and_after_the_peer_posted_the_receive():
    for name in names():
        options = {"vp": 2} if name in ("interleaved-1f1b", "breadth-first") else {}
        lowered = lower(build(name, 4, 8, **options))
        placement = lowered.placement
        positions = [{a: i for i, a in enumerate(program)} for program in lowered.programs]
        for rank, completions in enumerate(send_completions(lowered)):
            completed = [send for sends in completions.values() for send in sends]
            assert len(completed) == len(set(completed)), name
            for proof, sends in completions.items():
                forward = proof.kind is Kind.RECV_F
                producer = proof.stage - 1 if forward else proof.stage + 1
                peer = placement.stage_ranks[producer]
                reply = Action(producer, Kind.SEND_F if forward else Kind.SEND_B, proof.microbatch)
                for send in sends:
                    assert positions[rank][proof] > positions[rank][send], (name, proof, send)
                    if send.kind is Kind.SEND_F:
                        receive = Action(send.stage + 1, Kind.RECV_F, send.microbatch)
                    else:
                        receive = Action(send.stage - 1, Kind.RECV_B, send.microbatch)
                    assert positions[peer][reply] > positions[peer][receive], (name, proof, send)
