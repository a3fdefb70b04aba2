"""The validator rejects each broken rule with the rank, the action and the rule."""

import pytest

from megatron_bitpipe.schedules.errors import ScheduleError
from megatron_bitpipe.schedules.ir import Action, B, F, Kind
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.validate import validate
from schedule_fixtures import bidirectional_gpipe, one_f_one_b, vshape_gpipe


def replace_program(schedule, rank, program):
    programs = list(schedule.programs)
    programs[rank] = tuple(program)
    return schedule.with_programs(tuple(programs))


@pytest.mark.parametrize("build", [one_f_one_b, vshape_gpipe, bidirectional_gpipe])
def test_valid_schedules_pass_before_and_after_lowering(build):
    schedule = build(4, 8)
    validate(schedule)
    validate(lower(schedule))


def test_action_on_the_wrong_rank_is_rejected_naming_the_owner():
    schedule = one_f_one_b(2, 2)
    broken = replace_program(schedule, 0, [F(1, 0)] + list(schedule.programs[0]))
    with pytest.raises(ScheduleError, match=r"rank 0, action 1F0 .*stage 1 lives on rank 1"):
        validate(broken)


def test_missing_backward_is_rejected_naming_microbatch_and_stage():
    schedule = one_f_one_b(2, 2)
    broken = replace_program(schedule, 1, [a for a in schedule.programs[1] if a != B(1, 1)])
    with pytest.raises(ScheduleError, match=r"microbatch 1 is incomplete: missing 1B1"):
        validate(broken)


def test_duplicate_action_is_rejected():
    schedule = one_f_one_b(2, 2)
    broken = replace_program(schedule, 0, list(schedule.programs[0]) + [F(0, 0)])
    with pytest.raises(ScheduleError, match="runs twice"):
        validate(broken)


def test_backward_before_its_own_forward_is_rejected_with_the_grid():
    schedule = one_f_one_b(2, 2)
    broken = replace_program(schedule, 1, [B(1, 0), F(1, 0), F(1, 1), B(1, 1)])
    with pytest.raises(ScheduleError, match=r"(?s)needs 1F0 .*ERROR HERE"):
        validate(broken)


def test_cross_rank_cycle_is_reported_as_deadlock():
    schedule = one_f_one_b(2, 2)
    # rank 1 wants microbatch 1 first; rank 0 sends it only after microbatch 0's backward
    broken = replace_program(schedule, 0, [F(0, 0), B(0, 0), F(0, 1), B(0, 1)])
    broken = replace_program(broken, 1, [F(1, 1), B(1, 1), F(1, 0), B(1, 0)])
    with pytest.raises(ScheduleError, match="deadlock: rank 0 waits at 0B0 .*rank 1 waits at 1F1"):
        validate(broken)


def test_microbatch_in_the_wrong_pipeline_is_rejected():
    schedule = bidirectional_gpipe(2, 2)
    pipelines = (1, 1)
    from megatron_bitpipe.schedules.ir import Schedule

    broken = Schedule(schedule.name, schedule.placement, 2, pipelines, schedule.programs)
    with pytest.raises(ScheduleError, match="flows through pipeline 1"):
        validate(broken)


def test_receives_out_of_sender_order_are_rejected():
    lowered = lower(one_f_one_b(2, 2))
    program = list(lowered.programs[1])
    first, second = program.index(Action(1, Kind.RECV_F, 0)), program.index(Action(1, Kind.RECV_F, 1))
    program[first], program[second] = program[second], program[first]
    broken = replace_program(lowered, 1, program)
    with pytest.raises(ScheduleError, match="order|consumes"):
        validate(broken)


def test_send_across_a_local_hand_over_is_rejected():
    lowered = lower(vshape_gpipe(2, 1))
    turn = 1
    program = list(lowered.programs[1])
    program.insert(program.index(F(turn, 0)) + 1, Action(turn, Kind.SEND_F, 0))
    with pytest.raises(ScheduleError, match="no message crosses ranks"):
        validate(replace_program(lowered, 1, program))


def test_replica_syncs_in_different_orders_are_rejected():
    lowered = lower(bidirectional_gpipe(4, 4))
    program = list(lowered.programs[0])
    first_sync = next(a for a in program if a.kind is Kind.REDUCE_GRAD)
    program.remove(first_sync)
    program.append(first_sync)
    with pytest.raises(ScheduleError, match="replica syncs run in stage order"):
        validate(replace_program(lowered, 0, program))
