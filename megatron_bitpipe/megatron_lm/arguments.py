"""Our arguments inside Megatron-LM's, and the run plan they give, checked before anything starts.

``add_arguments`` is a Megatron-LM ``extra_args_provider``: it adds ``--pipeline-schedule`` and the
schedules' own options to Megatron-LM's parser, so ``pretrain_gpt.py`` accepts them. ``plan`` reads
the few Megatron-LM settings the schedule rules need straight from the command line, checks them
with ``run_plan`` (the rules our trainer uses) before any process group exists, and returns the
command line with the virtual stage count the placement needs (V and BitPipe place two stages of
each pipeline on every rank, which Megatron-LM calls ``--num-virtual-stages-per-pipeline-rank 2``).
It also reads the Megatron features some placements would run wrongly (``--num-experts`` with two
pipelines, ``--calculate-per-token-loss`` where the loss is not on the last rank), which
``run_plan.check_features`` refuses. Megatron-LM has no flag for ``variable_seq_lengths`` (its
``validate_args`` sets it False), so that rule cannot be reached from its command line.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from megatron_bitpipe.run_plan import ArgumentsError, RunPlan, validate_args
from megatron_bitpipe.schedules import rank_order
from megatron_bitpipe.schedules.choice import ScheduleChoice, known_names
from megatron_bitpipe.schedules.flags import MEGATRON_LM

VIRTUAL_STAGES = "--num-virtual-stages-per-pipeline-rank"
LAYERS_PER_VIRTUAL_STAGE = "--num-layers-per-virtual-pipeline-stage"
REFUSED = {
    "--pipeline-model-parallel-layout": "the schedule's placement decides which layers each rank holds",
    "--decoder-first-pipeline-num-layers": "placements split the layers evenly over the stages",
    "--decoder-last-pipeline-num-layers": "placements split the layers evenly over the stages",
    "--mtp-num-layers": "multi-token prediction layers are not placed by our schedules yet",
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's ``extra_args_provider``: our options in their own group."""
    group = parser.add_argument_group(title="megatron-bitpipe pipeline schedules")
    group.add_argument(
        "--pipeline-schedule",
        default=None,
        help=f"one of {', '.join(_launchable())} "
        "(megatron-*: megatron-core's own functions)",
    )
    group.add_argument(
        "--max-inflight", type=int, default=None, help="bitpipe: activations in flight per direction"
    )
    group.add_argument(
        "--max-stash",
        type=int,
        default=None,
        help="bitpipe, bitpipe-zb: chunk activations stashed per rank, D..3D (default 2D)",
    )
    group.add_argument(
        "--pipeline-rank-order",
        default=rank_order.CONSECUTIVE,
        help="consecutive, or replica-pairs: pipeline ranks r and D-1-r in adjacent process slots",
    )
    return parser


def pipeline_rank_order(argv: Sequence[str]) -> tuple[str, int]:
    """``--pipeline-rank-order`` and ``--pipeline-model-parallel-size`` of a command line."""
    known, _ = _preparser().parse_known_args(list(argv))
    return known.pipeline_rank_order, known.pipeline_model_parallel_size


def _preparser() -> argparse.ArgumentParser:
    """The Megatron-LM settings the schedule rules read, with Megatron-LM's defaults."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_arguments(parser)
    add = parser.add_argument
    for flag in (
        "--pipeline-model-parallel-size",
        "--tensor-model-parallel-size",
        "--context-parallel-size",
    ):
        add(flag, type=int, default=1)
    for flag in (
        "--micro-batch-size",
        "--global-batch-size",
        "--num-layers",
        "--hidden-size",
        "--ffn-hidden-size",
        "--num-attention-heads",
        "--seq-length",
        "--max-position-embeddings",
        LAYERS_PER_VIRTUAL_STAGE,
        VIRTUAL_STAGES,
        "--microbatch-group-size-per-virtual-pipeline-stage",  # Megatron-LM's own flag
        "--num-experts",
    ):
        add(flag, type=int, default=None)
    for flag in (
        "--sequence-parallel",
        "--bf16",
        "--fp16",
        "--untie-embeddings-and-output-weights",
        "--calculate-per-token-loss",
    ):
        add(flag, action="store_true")
    for flag in REFUSED:
        add(flag, default=None)
    return parser


def plan(argv: Sequence[str], world_size: int) -> tuple[RunPlan, list[str]]:
    """The validated plan of a Megatron-LM command line, and the command line to run.

    Raises ArgumentsError naming the setting and the rule.
    """
    known, _ = _preparser().parse_known_args(list(argv))
    schedule = known.pipeline_schedule
    if schedule is None:
        raise ArgumentsError(
            "--pipeline-schedule is required: one of "
            f"{', '.join(_launchable())}"
        )
    choice = ScheduleChoice(schedule)
    if "," in schedule or choice.is_reference:
        raise ArgumentsError(
            f"--pipeline-schedule {schedule}: give one schedule (for PP=1 use 1f1b, which builds "
            f"the model with the same initialization as every other layout)"
        )
    if known.micro_batch_size is None:
        raise ArgumentsError("--micro-batch-size is required")
    for flag, reason in REFUSED.items():
        if getattr(known, _dest(flag)) is not None:
            raise ArgumentsError(f"{flag} cannot be used with --pipeline-schedule {schedule}: {reason}")
    if known.context_parallel_size != 1:
        raise ArgumentsError(
            f"--context-parallel-size {known.context_parallel_size}: our schedules run with "
            f"context parallel size 1 for now"
        )
    user_virtual = _virtual_stages(known)
    takes_virtual = choice.takes_virtual_size
    plans = validate_args(
        _namespace(known, user_virtual if takes_virtual else None), world_size, MEGATRON_LM
    )
    run = plans[0]
    needed = _virtual_size_of(run)
    if takes_virtual or needed is None:
        if user_virtual is not None and not takes_virtual:
            raise ArgumentsError(
                f"{VIRTUAL_STAGES} {user_virtual}: --pipeline-schedule {schedule} places one stage "
                f"of the pipeline on each rank; leave it out"
            )
        if user_virtual is None and needed is not None:
            # the schedule's default (interleaved-1f1b: vp 2): Megatron-LM must build as many chunks
            return run, [*argv, VIRTUAL_STAGES, str(needed)]
        return run, list(argv)
    if user_virtual is not None and user_virtual != needed:
        raise ArgumentsError(
            f"{VIRTUAL_STAGES} {user_virtual}: --pipeline-schedule {schedule} places {needed} "
            f"stages of each pipeline on every rank; give {needed} or leave it out"
        )
    if run.placement.num_ranks == 1:
        raise ArgumentsError(
            f"--pipeline-schedule {schedule} at --pipeline-model-parallel-size 1: Megatron-LM "
            f"allows virtual stages only with pipeline parallelism; use 1f1b for PP=1"
        )
    if user_virtual is None:
        return run, [*argv, VIRTUAL_STAGES, str(needed)]
    return run, list(argv)


def _launchable() -> list[str]:
    """The schedules the launcher runs: all but the unpipelined reference."""
    return [name for name in known_names() if not ScheduleChoice(name).is_reference]


def _virtual_size_of(run: RunPlan) -> int | None:
    """The virtual pipeline size Megatron-LM must be told for the plan's placement."""
    if run.virtual_size is not None:
        return run.virtual_size
    per_rank = run.placement.stages_per_pipeline // run.placement.num_ranks
    return per_rank if per_rank > 1 else None


def _virtual_stages(known: argparse.Namespace) -> int | None:
    if known.num_virtual_stages_per_pipeline_rank is not None:
        if known.num_layers_per_virtual_pipeline_stage is not None:
            raise ArgumentsError(
                f"give only one of {VIRTUAL_STAGES} and {LAYERS_PER_VIRTUAL_STAGE}"
            )
        return known.num_virtual_stages_per_pipeline_rank
    per_stage = known.num_layers_per_virtual_pipeline_stage
    if per_stage is None:
        return None
    pp = known.pipeline_model_parallel_size
    if known.num_layers is None or known.num_layers % pp or (known.num_layers // pp) % per_stage:
        raise ArgumentsError(
            f"--num-layers {known.num_layers} / --pipeline-model-parallel-size {pp} must be "
            f"divisible by {LAYERS_PER_VIRTUAL_STAGE} {per_stage}"
        )
    return known.num_layers // pp // per_stage


def _namespace(known: argparse.Namespace, virtual: int | None) -> argparse.Namespace:
    """The trainer's argument names (run_plan's), from Megatron-LM's."""
    values: dict[str, Any] = dict(vars(known))
    values["virtual_pipeline_model_parallel_size"] = virtual
    values["num_layers_per_virtual_pipeline_stage"] = None
    values["trace"] = values["save_params"] = None
    values["vocab_size"] = None  # Megatron-LM pads the vocabulary to a multiple of TP itself
    return argparse.Namespace(**values)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
