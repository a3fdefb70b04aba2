"""The dataflow engine runs ir's rule set; the validator and the simulator see what it sees."""

import importlib

import pytest

from megatron_bitpipe.schedules.dataflow import (
    compile_rules,
    describe,
    ready_order,
    run,
)
from megatron_bitpipe.schedules.errors import ScheduleError
from megatron_bitpipe.schedules.ir import COMPUTE_KINDS, Action, B, F, Kind, produces, requires
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.simulate import Costs, timeline
from megatron_bitpipe.schedules.validate import dry_run, validate
from schedule_fixtures import bidirectional_gpipe, one_f_one_b, vshape_gpipe

BUILDS = [one_f_one_b, vshape_gpipe, bidirectional_gpipe]
# the modules, not the functions the package exports under the same names
validate_module = importlib.import_module("megatron_bitpipe.schedules.validate")
simulate_module = importlib.import_module("megatron_bitpipe.schedules.simulate")


def crossed_1f1b():
    """Rank 0 waits for microbatch 0's gradient, which rank 1 makes only after microbatch 1."""
    schedule = one_f_one_b(2, 2)
    return schedule.with_programs(
        ((F(0, 0), B(0, 0), F(0, 1), B(0, 1)), (F(1, 1), B(1, 1), F(1, 0), B(1, 0)))
    )


def ran_actions(programs, outcome):
    return [(rank, programs[rank][position]) for rank, position in ready_order(outcome)]


@pytest.mark.parametrize("build", BUILDS)
def test_compiled_rules_say_what_ir_requires_and_produces(build):
    schedule = build(4, 6)
    rules = compile_rules(schedule, messages=False)
    microbatch = 5
    shift = microbatch * rules.facts_per_microbatch
    for kind in COMPUTE_KINDS:
        for stage in range(schedule.placement.num_stages):
            action = Action(stage, kind, microbatch)
            needs, makes = rules.table[kind][stage]
            assert tuple(describe(rules, fact + shift) for fact, _ in needs) == requires(action, schedule.placement)
            assert tuple(describe(rules, fact + shift) for fact in makes) == produces(action)


@pytest.mark.parametrize("build", BUILDS)
def test_every_rank_runs_its_whole_program_in_program_order(build):
    schedule = lower(build(4, 6))
    outcome = run(schedule.programs, compile_rules(schedule, messages=True))
    positions = {rank: [] for rank in range(schedule.num_ranks)}
    for rank, position in ready_order(outcome):
        positions[rank].append(position)
    assert outcome.blocked == []
    assert positions == {rank: list(range(len(program))) for rank, program in enumerate(schedule.programs)}


@pytest.mark.parametrize("build", BUILDS)
def test_an_action_runs_only_after_every_fact_it_requires_is_made(build):
    schedule = build(4, 6)
    made = set()
    for _, action in ran_actions(schedule.programs, run(schedule.programs, compile_rules(schedule, messages=False))):
        assert set(requires(action, schedule.placement)) <= made, action
        made.update(produces(action))


def test_in_a_lowered_program_an_input_from_another_rank_arrives_with_its_send_not_its_producer():
    schedule = lower(one_f_one_b(2, 1))
    late_send = (F(0, 0), Action(0, Kind.RECV_B, 0), B(0, 0), Action(0, Kind.SEND_F, 0))
    programs = (late_send, schedule.programs[1])
    rules = compile_rules(schedule, messages=True)
    outcome = run(programs, rules)
    assert [(rank, position, describe(rules, fact)) for rank, position, fact in outcome.blocked] == [
        (0, 2, ("message(input_grad)", 1, 0)),
        (1, 1, ("message(activation)", 0, 0)),
    ]


def test_without_messages_an_input_exists_once_its_producer_ran():
    schedule = lower(one_f_one_b(2, 1))
    late_send = (F(0, 0), Action(0, Kind.RECV_B, 0), B(0, 0), Action(0, Kind.SEND_F, 0))
    outcome = run((late_send, schedule.programs[1]), compile_rules(schedule, messages=False))
    assert outcome.blocked == []


def test_sends_receive_posts_and_syncs_never_wait():
    schedule = lower(bidirectional_gpipe(2, 2))
    communication = tuple(tuple(action for action in program if not action.is_compute) for program in schedule.programs)
    outcome = run(communication, compile_rules(schedule, messages=True))
    assert outcome.blocked == []
    assert len(list(ready_order(outcome))) == sum(map(len, communication))


def test_a_same_rank_hand_over_needs_no_message():
    schedule = vshape_gpipe(2, 1)  # stages 1 and 2 both live on rank 1: the V turn
    rules = compile_rules(lower(schedule), messages=True)
    [(turn, _)], _ = rules.table[Kind.F][2]
    [(hop, _)], _ = rules.table[Kind.F][1]
    assert describe(rules, turn) == ("activation", 1, 0)
    assert describe(rules, hop) == ("message(activation)", 0, 0)


def test_a_deadlock_names_each_stuck_rank_its_action_and_the_fact_it_waits_for():
    schedule = crossed_1f1b()
    rules = compile_rules(schedule, messages=False)
    outcome = run(schedule.programs, rules)
    stuck = [
        (blocked.rank, schedule.programs[blocked.rank][blocked.position], describe(rules, blocked.fact))
        for blocked in outcome.blocked
    ]
    assert stuck == [(0, B(0, 0), ("input_grad", 1, 0)), (1, F(1, 1), ("activation", 0, 1))]


def test_the_validator_and_the_simulator_report_the_engines_deadlock():
    schedule = crossed_1f1b()
    assert dry_run(schedule) == [(0, 1, ("input_grad", 1, 0)), (1, 0, ("activation", 0, 1))]
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 waits at 0B0 for input_grad of stage 1 mb 0"):
        validate(schedule)
    with pytest.raises(ScheduleError, match=r"cannot progress \(deadlock\): rank 0 at 0B0, rank 1 at 1F1"):
        timeline(schedule, Costs())


@pytest.mark.parametrize("build", BUILDS)
def test_the_validator_and_the_simulator_agree_on_the_order_actions_become_ready(build, monkeypatch):
    schedule = build(4, 6)
    orders = {}

    def recording(client):
        def run_and_record(programs, rules):
            outcome = run(programs, rules)
            orders[client] = ran_actions(programs, outcome)
            return outcome

        return run_and_record

    monkeypatch.setattr(validate_module, "run", recording("validator"))
    monkeypatch.setattr(simulate_module, "run", recording("simulator"))
    validate(schedule)
    events = timeline(schedule, Costs(latency=0.5))
    assert orders["validator"] == orders["simulator"] == [(event.rank, event.action) for event in events]


def test_the_simulator_starts_an_action_when_its_rank_is_free_and_its_inputs_arrived():
    events = timeline(one_f_one_b(2, 1), Costs(forward=1, backward=2, latency=0.5))
    spans = {str(event.action): (event.start, event.end) for event in events}
    assert spans == {"0F0": (0, 1), "1F0": (1.5, 2.5), "1B0": (2.5, 4.5), "0B0": (5, 7)}

