"""The fitted simulator: costs fitted to --profile-step files, its prediction, the step breakdown.

Profiles here are made from the simulator's own timeline with known costs, the way the executor
records a step (a wait for a message inside the action that needs it), so a correct fit gives
those costs back and predicts that step exactly.
"""

import json

import pytest

from megatron_bitpipe.scale import bench_report, measured_costs
from megatron_bitpipe.scale.bench import Measured, run_order
from megatron_bitpipe.schedules import registry
from megatron_bitpipe.schedules.simulate import Costs, timeline

LAYERS = 8
LAYER_PARAMETERS = 1000
F_LAYER, F_ACTION, F_EMBEDDING, F_HEAD = 2.0, 1.0, 0.5, 1.5
B_LAYER, B_ACTION, B_EMBEDDING, B_HEAD = 4.0, 1.5, 0.25, 0.75
I_SHARE = 0.6
LATENCY_MS, MS_PER_MB = 0.2, 0.5
ACTIVATION_BYTES = 2**19
OPTIMIZER_MS_PER_MPARAM, OTHER_MS, FINALIZE_MS = 100.0, 3.0, 2.0


def _true_costs(schedule):
    layers = LAYERS / schedule.placement.stages_per_pipeline
    forward = layers * F_LAYER + F_ACTION
    backward = layers * B_LAYER + B_ACTION
    return Costs(
        forward=forward,
        backward=backward,
        input_grad=backward * I_SHARE,
        weight_grad=backward * (1 - I_SHARE),
        stage_extra={0: (F_EMBEDDING, B_EMBEDDING), -1: (F_HEAD, B_HEAD)},
        latency=LATENCY_MS,
        bandwidth=2**20 / MS_PER_MB,
        message_bytes=ACTIVATION_BYTES,
    )


def synthetic_profile(name, num_ranks=2, num_microbatches=4):
    """A --profile-step file of ``name`` whose actions follow the simulator with the true costs."""
    schedule = registry.build(name, num_ranks, num_microbatches)
    placement = schedule.placement
    layers = LAYERS // placement.stages_per_pipeline
    events = timeline(schedule, _true_costs(schedule))
    records = []
    makespan = max(event.end for event in events)
    for rank in range(num_ranks):
        mine = sorted((event for event in events if event.rank == rank), key=lambda event: event.start)
        actions, previous_end = [], 0.0
        for event in mine:
            waited = event.start - previous_end
            actions.append([str(event.action), previous_end / 1e3, event.end / 1e3, waited / 1e3, None])
            previous_end = event.end
            stage, kind = event.action.stage, event.action.kind.value
            neighbour = placement.next_stage(stage) if kind == "F" else placement.prev_stage(stage)
            if kind in ("F", "B", "I") and neighbour is not None and placement.rank_of(neighbour) != rank:
                send = f"{stage}SEND_{'F' if kind == 'F' else 'B'}{event.action.microbatch}"
                actions.append([send, event.end / 1e3, event.end / 1e3, 0.0, None])
        chunks = [
            {
                "stage": stage,
                "layers": layers,
                "parameters": layers * LAYER_PARAMETERS,
                "embedding": placement.is_first(stage),
                "head": placement.is_last(stage),
            }
            for stage in placement.rank_stages[rank]
        ]
        parameters = sum(chunk["parameters"] for chunk in chunks)
        optimizer_s = OPTIMIZER_MS_PER_MPARAM * parameters / 1e6 / 1e3
        finalize_s = FINALIZE_MS / 1e3
        step = {
            "iteration": 2,
            "actions": actions,
            "finalize_s": finalize_s,
            "optimizer_s": optimizer_s,
            "step_s": makespan / 1e3 + finalize_s + optimizer_s + OTHER_MS / 1e3,
        }
        records.append({
            "rank": rank,
            "steps": [step, {**step, "iteration": 3}],
            "chunks": chunks,
            "message": [[size, (LATENCY_MS + size / 2**20 * MS_PER_MB) / 1e3] for size in (2**19, 2**20, 2**21)],
            "sync": [],
        })
    return {
        "schedule": name, "options": {}, "num_ranks": num_ranks, "num_pipelines": placement.num_pipelines,
        "num_microbatches": num_microbatches, "num_layers": LAYERS, "activation_bytes": ACTIVATION_BYTES,
        "hidden_size": 64, "seq_length": 32, "micro_batch_size": 2, "num_attention_heads": 4,
        "ranks": records,
    }


def test_fit_recovers_per_layer_per_action_embedding_and_head_costs():
    costs = measured_costs.fit([synthetic_profile("1f1b"), synthetic_profile("bitpipe")])
    forward, backward = costs.kind("F"), costs.kind("B")
    assert (forward.per_layer_ms, forward.per_action_ms, forward.embedding_ms, forward.head_ms) == pytest.approx(
        (F_LAYER, F_ACTION, F_EMBEDDING, F_HEAD), abs=1e-3)
    assert (backward.per_layer_ms, backward.per_action_ms, backward.embedding_ms, backward.head_ms) == pytest.approx(
        (B_LAYER, B_ACTION, B_EMBEDDING, B_HEAD), abs=1e-3)


def test_fit_recovers_messages_optimizer_and_the_rest_of_the_step():
    profiles = [synthetic_profile("1f1b"), synthetic_profile("bitpipe")]
    assert any(measured_costs._observed_message_ms(profile) for profile in profiles), "waits observed"
    costs = measured_costs.fit(profiles)
    assert costs.message_latency_ms == pytest.approx(LATENCY_MS)
    assert costs.message_ms_per_mb == pytest.approx(MS_PER_MB)
    activation_ms = LATENCY_MS + ACTIVATION_BYTES / 2**20 * MS_PER_MB
    assert costs.observed_message_ms == pytest.approx(activation_ms), "a waited-for message took its transfer"
    assert costs.optimizer_ms_per_mparam == pytest.approx(OPTIMIZER_MS_PER_MPARAM)
    assert costs.step_other_ms == pytest.approx(OTHER_MS, abs=1e-6)
    assert costs.finalize_ms == pytest.approx(FINALIZE_MS)
    assert costs.action_overhead_ms == pytest.approx(0.0, abs=1e-9)
    assert costs.parameters_per_layer == LAYER_PARAMETERS
    assert (costs.hidden_size, costs.seq_length, costs.micro_batch_size, costs.num_attention_heads) == (64, 32, 2, 4)


def test_one_schedule_alone_fits_no_negative_extras_and_predicts_its_own_step():
    profile = synthetic_profile("1f1b")
    costs = measured_costs.fit([profile])
    for kind in ("F", "B"):
        cost = costs.kind(kind)
        assert min(cost.embedding_ms, cost.head_ms, cost.per_action_ms) >= 0
    predicted = measured_costs.predict_step_ms(costs, "1f1b", 2, 4, measured_costs.parameters_per_rank(profile))
    assert predicted == pytest.approx(measured_costs.measured_step_ms(profile), rel=1e-3)


def test_two_pipeline_finalization_is_what_the_simulated_replica_syncs_leave():
    from dataclasses import replace

    from megatron_bitpipe.schedules.lower import lower
    from megatron_bitpipe.schedules.simulate import simulate

    costs = replace(measured_costs.fit([synthetic_profile("bitpipe")]), sync_ms_per_mb=50.0,
                    replica_finalize_ms=100.0, finalize_ms=7.0)
    schedule = registry.build("bitpipe", 2, 4)
    stage_costs = measured_costs.simulator_costs(costs, schedule)
    tail = simulate(lower(schedule), stage_costs).makespan - simulate(schedule, stage_costs).makespan
    assert 0 < tail < 100
    result = simulate(lower(schedule), stage_costs)
    assert measured_costs.finalize_ms(costs, 2, result) == pytest.approx(100 - tail)
    assert measured_costs.finalize_ms(costs, 1, result) == 7.0


def test_split_kinds_of_one_layer_count_take_their_share_of_the_backward():
    costs = measured_costs.fit([synthetic_profile("1f1b"), synthetic_profile("bitpipe"), synthetic_profile("zb-h1")])
    assert costs.kind("I").per_layer_ms == pytest.approx(B_LAYER * I_SHARE, rel=1e-3)
    assert costs.kind("W").per_layer_ms == pytest.approx(B_LAYER * (1 - I_SHARE), rel=1e-3)


@pytest.mark.parametrize("name", ["1f1b", "bitpipe", "zb-h1"])
def test_prediction_from_fitted_costs_equals_the_step_they_were_measured_in(name):
    profiles = [synthetic_profile("1f1b"), synthetic_profile("bitpipe"), synthetic_profile("zb-h1")]
    costs = measured_costs.fit(profiles)
    profile = next(profile for profile in profiles if profile["schedule"] == name)
    measured = measured_costs.measured_step_ms(profile)
    predicted = measured_costs.predict_step_ms(costs, name, 2, 4, measured_costs.parameters_per_rank(profile))
    assert predicted == pytest.approx(measured, rel=1e-3)


def test_breakdown_parts_add_up_to_the_step_and_waits_are_idle():
    profile = synthetic_profile("1f1b")
    for row in measured_costs.breakdown(profile):
        assert sum(row[part] for part in measured_costs.PARTS) == pytest.approx(row["step"])
        assert row["waiting"] > 0
        assert row["optimizer"] == pytest.approx(OPTIMIZER_MS_PER_MPARAM * 4 * LAYER_PARAMETERS / 1e6)


def test_costs_json_round_trips(tmp_path):
    costs = measured_costs.fit([synthetic_profile("1f1b"), synthetic_profile("bitpipe")])
    measured_costs.save(costs, tmp_path / "costs.json")
    assert measured_costs.load(tmp_path / "costs.json") == costs
    assert json.loads((tmp_path / "costs.json").read_text())["basis"] == "wall"


def test_fit_refuses_an_unknown_basis():
    with pytest.raises(ValueError, match="basis"):
        measured_costs.fit([synthetic_profile("1f1b")], basis="gpu")


def test_runs_alternate_the_schedule_order():
    assert run_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert run_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert run_order(["a", "b", "c"], 2) == ["a", "b", "c"]


def test_report_fills_simulated_step_error_and_ratios_from_profiles(tmp_path):
    names = ["1f1b", "bitpipe"]
    runs = []
    for run in range(2):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        figures = {}
        for name in names:
            profile = synthetic_profile(name)
            (folder / f"{name}.json").write_text(json.dumps(profile))
            step = measured_costs.measured_step_ms(profile)
            figures[name] = Measured(name, (step,), (1,), 1000)
        runs.append(figures)
    report = bench_report.build(names, runs, tmp_path)
    by_name = {row["schedule"]: row for row in report.rows}
    for name in names:
        assert abs(float(by_name[name]["error_pct"])) < 0.1
        assert by_name[name]["runs"] == "2"
    assert set(report.breakdown) == set(names)
    text = bench_report.markdown(report)
    assert "fitted costs" in text and "| bitpipe |" in text


def test_simulate_command_takes_measured_costs(tmp_path, capsys):
    from megatron_bitpipe import cli

    costs = measured_costs.fit([synthetic_profile("1f1b"), synthetic_profile("bitpipe")])
    measured_costs.save(costs, tmp_path / "costs.json")
    status = cli.main(["simulate", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4",
                       "--measured-costs", str(tmp_path / "costs.json")])
    printed = capsys.readouterr().out
    assert status == 0 and "costs measured in" in printed
    step = measured_costs.measured_step_ms(synthetic_profile("1f1b"))
    compute_only = step - FINALIZE_MS - OTHER_MS - OPTIMIZER_MS_PER_MPARAM * 4 * LAYER_PARAMETERS / 1e6
    assert f"{compute_only:g}"[:5] in printed


def test_a_file_that_is_not_costs_json_is_refused_in_one_line(tmp_path):
    (tmp_path / "costs.json").write_text('{"basis": "wall"}')
    with pytest.raises(ValueError) as error:
        measured_costs.load(tmp_path / "costs.json")
    assert "rerun the bench" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("local_rank, local_ranks, cores, kept", [
    (0, 2, [0, 1], [0]), (1, 2, [0, 1], [1]), (1, 2, [0, 1, 2, 3], [2, 3]), (3, 4, [0, 1], None),
])
def test_pinned_ranks_take_their_own_share_of_the_cores(monkeypatch, local_rank, local_ranks, cores, kept):
    from megatron_bitpipe import train

    pinned = []
    monkeypatch.setenv(train.PIN_VARIABLE, "1")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: set(cores))
    monkeypatch.setattr(train.os, "sched_setaffinity", lambda pid, chosen: pinned.append(sorted(chosen)))
    train._pin_to_cores()
    assert pinned == ([] if kept is None else [kept])
