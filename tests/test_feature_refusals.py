"""Megatron features that some placements would run wrongly are refused before anything starts.

``run_plan.validate_args`` is shared by our trainer and the Megatron-LM launcher, and reads
Megatron-LM's setting names. Our trainer has none of these flags (its parser stops them as
unrecognized), so the rules are checked here on a Namespace carrying Megatron-LM's names, as the
launcher passes them; ``test_megatron_lm.py`` checks them from Megatron-LM's command line.
"""

from __future__ import annotations

import argparse

import pytest

from megatron_bitpipe import run_plan
from megatron_bitpipe.run_plan import ArgumentsError, RunPlan, validate_args
from megatron_bitpipe.schedules import names
from megatron_bitpipe.train_args import build_parser
from schedule_fixtures import receives_posted_at_use

TWO_PIPELINES = ["bitpipe", "bitpipe-official", "chimera"]
ONE_PIPELINE = ["1f1b", "interleaved-1f1b", "zb-h1", "v-half", "v-zb", "megatron-1f1b"]
LOSS_ON_RANK_0 = ["v-min", "v-half", "v-zb", "bitpipe", "bitpipe-official", "chimera"]
LOSS_ON_LAST_RANK = ["gpipe", "1f1b", "interleaved-1f1b", "breadth-first", "zb-h1", "megatron-1f1b"]


def settings(schedule: str, pp: int = 4, **megatron: object) -> argparse.Namespace:
    """The trainer's defaults for ``schedule`` at PP=``pp``, plus Megatron-LM settings."""
    args = build_parser().parse_args(
        ["--pipeline-model-parallel-size", str(pp), "--pipeline-schedule", schedule]
    )
    for name, value in megatron.items():
        setattr(args, name, value)
    return args


def validate(schedule: str, pp: int = 4, **megatron: object) -> list[RunPlan]:
    return validate_args(settings(schedule, pp, **megatron), world_size=pp)


def refusal(schedule: str, pp: int = 4, **megatron: object) -> str:
    with pytest.raises(ArgumentsError) as raised:
        validate(schedule, pp, **megatron)
    return str(raised.value)


@pytest.mark.parametrize("schedule", TWO_PIPELINES)
def test_moe_is_refused_with_two_pipeline_replicas(schedule):
    assert refusal(schedule, num_experts=4) == (
        f"--num-experts 4: --pipeline-schedule {schedule} runs two pipeline replicas whose "
        "expert gradients megatron's expert data-parallel group cannot reduce (it lacks the "
        "partner rank D-1-r, so the expert copies drift apart); use a one-pipeline schedule"
    )


@pytest.mark.parametrize("schedule", ONE_PIPELINE)
def test_moe_passes_with_one_pipeline(schedule):
    assert validate(schedule, num_experts=4)[0].schedule == schedule


@pytest.mark.parametrize("experts", [None, 0])
def test_no_experts_means_no_moe_as_in_megatron_lm(experts):
    assert validate("bitpipe", num_experts=experts)[0].schedule == "bitpipe"


@pytest.mark.parametrize("schedule", LOSS_ON_RANK_0)
def test_per_token_loss_is_refused_where_a_loss_head_is_not_on_the_last_rank(schedule):
    message = refusal(schedule, calculate_per_token_loss=True)
    assert message.startswith(
        f"--calculate-per-token-loss: --pipeline-schedule {schedule} computes the loss on "
        "pipeline ranks [0"
    )
    assert "takes the token count from the last pipeline rank 3 only" in message


@pytest.mark.parametrize("schedule", LOSS_ON_LAST_RANK)
def test_per_token_loss_passes_where_the_loss_is_on_the_last_rank_only(schedule):
    assert validate(schedule, calculate_per_token_loss=True)[0].schedule == schedule


def test_per_token_loss_passes_with_megatrons_interleaved_schedule():
    args = settings("megatron-interleaved", calculate_per_token_loss=True)
    args.virtual_pipeline_model_parallel_size = 2
    assert validate_args(args, world_size=4)[0].virtual_size == 2


def test_per_token_loss_passes_with_a_v_on_one_rank():
    """At PP=1 the V's loss head is on rank 0, which is the last rank."""
    assert validate("v-half", pp=1, calculate_per_token_loss=True)[0].schedule == "v-half"


@pytest.mark.parametrize("schedule", names())
def test_variable_sequence_lengths_are_refused_with_every_registry_schedule(schedule):
    assert refusal(schedule, variable_seq_lengths=True).startswith(
        f"variable_seq_lengths: --pipeline-schedule {schedule} sends every activation in a "
        "buffer of the one shape --seq-length and --micro-batch-size give"
    )


def test_variable_sequence_lengths_pass_with_megatrons_own_1f1b():
    assert validate("megatron-1f1b", variable_seq_lengths=True)[0].schedule == "megatron-1f1b"


def test_each_schedule_of_a_list_is_checked():
    message = refusal("1f1b,bitpipe", num_experts=4)
    assert message.startswith("--num-experts 4: --pipeline-schedule bitpipe")


@pytest.mark.parametrize(
    "setting",
    [{"num_experts": 4}, {"calculate_per_token_loss": True}, {"variable_seq_lengths": True}],
    ids=["moe", "per-token-loss", "variable-seq-lengths"],
)
def test_each_refusal_is_one_line(setting):
    assert "\n" not in refusal("bitpipe", **setting)


def test_a_schedule_whose_step_could_hang_on_nccl_is_refused_with_one_connection(monkeypatch):
    """The receive order lowering had before its global order hangs interleaved-1f1b at D=2,
    N=4 when every stream shares one hardware queue; with CUDA's default of 8 it does not."""
    real_lower = run_plan.lower
    monkeypatch.setattr(run_plan, "lower", lambda s, **kw: receives_posted_at_use(real_lower(s, **kw)))
    args = settings("interleaved-1f1b", pp=2, global_batch_size=4, micro_batch_size=1)
    validate_args(args, world_size=2)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with pytest.raises(ArgumentsError) as raised:
        validate_args(args, world_size=2)
    assert str(raised.value).startswith(
        "CUDA_DEVICE_MAX_CONNECTIONS=1: --pipeline-schedule interleaved-1f1b at "
        "--pipeline-model-parallel-size 2 with 4 microbatches could hang on NCCL (rank 0's GPU "
        "cannot start send"
    )


@pytest.mark.parametrize("schedule", names())
def test_every_registry_schedule_passes_the_nccl_check_with_one_connection(monkeypatch, schedule):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    assert validate(schedule, pp=4, global_batch_size=16, micro_batch_size=1)


def test_a_connection_count_that_is_no_integer_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "many")
    assert refusal("1f1b") == "CUDA_DEVICE_MAX_CONNECTIONS=many: must be an integer >= 1"


@pytest.mark.parametrize(
    "recompute,message",
    [
        ({"recompute_granularity": "full"}, "--recompute-granularity full needs --recompute-method"),
        ({"recompute_method": "uniform", "recompute_num_layers": 1}, "go with --recompute-granularity full, got None"),
        ({"recompute_granularity": "selective", "recompute_num_layers": 1}, "got selective"),
        (
            {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 0},
            "--recompute-num-layers 0: must be an integer >= 1",
        ),
    ],
)
def test_recompute_settings_megatron_rejects_are_one_line(recompute, message):
    assert message in refusal("zb-h1", **recompute)


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_recompute_is_accepted_with_every_split_schedule(granularity):
    full = {"recompute_method": "uniform", "recompute_num_layers": 1} if granularity == "full" else {}
    for schedule in ("zb-h1", "v-min", "v-half", "v-zb"):
        assert validate(schedule, recompute_granularity=granularity, **full)
