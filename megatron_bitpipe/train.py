"""Train a megatron-core GPT on mock data with any pipeline schedule (CPU/gloo or GPU/NCCL).

    torchrun --nproc-per-node 4 -m megatron_bitpipe.train --pipeline-model-parallel-size 4 \\
        --pipeline-schedule bitpipe --num-layers 16 --global-batch-size 16 --train-iters 5

Argument names follow Megatron-LM. ``--pipeline-schedule`` takes every registry name, plus
``megatron-1f1b`` / ``megatron-interleaved`` (megatron-core's own functions) and ``none``
(PP=1, ``forward_backward_no_pipelining``: the single-process reference). Everything is checked
before any process group exists; errors name the setting and the rule.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_bitpipe.schedules import ScheduleConfigError, build, get, names
from megatron_bitpipe.schedules.placement import Placement, looped

MEGATRON_SCHEDULES = ("megatron-1f1b", "megatron-interleaved", "none")


class ArgumentsError(ValueError):
    """A setting that cannot run; the message names the setting and the rule."""


@dataclass(frozen=True)
class RunPlan:
    """What the validated arguments resolve to."""

    world_size: int
    data_parallel_size: int
    num_microbatches: int
    schedule: str
    schedule_options: tuple[tuple[str, Any], ...]
    placement: Placement
    virtual_size: int | None
    """megatron-interleaved's vp (parallel_state and config), else None."""

    @property
    def uses_registry(self) -> bool:
        return self.schedule not in MEGATRON_SCHEDULES

    def output_path(self, template: str) -> str:
        """``template`` with ``{schedule}`` replaced by this plan's schedule name."""
        return template.replace("{schedule}", self.schedule)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron_bitpipe.train", description=__doc__.split("\n")[0]
    )
    add = parser.add_argument
    add("--pipeline-model-parallel-size", type=int, default=1)
    add("--tensor-model-parallel-size", type=int, default=1)
    add("--virtual-pipeline-model-parallel-size", type=int, default=None)
    add("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    add("--microbatch-group-size-per-virtual-pipeline-stage", type=int, default=None)
    add(
        "--pipeline-schedule",
        default="1f1b",
        help="registry name, megatron-1f1b, megatron-interleaved or none; several: comma separated",
    )
    add("--num-layers", type=int, default=16)
    add("--hidden-size", type=int, default=32)
    add("--ffn-hidden-size", type=int, default=None)
    add("--num-attention-heads", type=int, default=4)
    add("--seq-length", type=int, default=16)
    add("--max-position-embeddings", type=int, default=None)
    add("--vocab-size", type=int, default=64)
    add("--micro-batch-size", type=int, default=2)
    add("--global-batch-size", type=int, default=16)
    add("--train-iters", type=int, default=5)
    add(
        "--eval-iters",
        type=int,
        default=0,
        help="forward-only steps after training (validation loss)",
    )
    add("--lr", type=float, default=1e-4)
    add("--weight-decay", type=float, default=0.01)
    add("--adam-eps", type=float, default=1e-8)
    add("--clip-grad", type=float, default=1.0, help="gradient norm clipping (0: off)")
    add(
        "--hidden-dropout",
        type=float,
        default=0.0,
        help="0 by default: the oracle needs determinism",
    )
    add("--attention-dropout", type=float, default=0.0)
    add("--seed", type=int, default=1234)
    add("--bf16", action="store_true", help="bf16 parameters and activations, fp32 main weights")
    add("--fp16", action="store_true", help="fp16 with megatron's dynamic loss scaling")
    add("--loss-scale", type=float, default=None, help="static loss scale (fp16); default dynamic")
    add("--initial-loss-scale", type=float, default=2.0**32)
    add("--min-loss-scale", type=float, default=1.0)
    add("--loss-scale-window", type=float, default=1000)
    add("--hysteresis", type=int, default=2)
    add("--sequence-parallel", action="store_true")
    add("--untie-embeddings-and-output-weights", action="store_true")
    add("--use-distributed-optimizer", action="store_true")
    add("--overlap-grad-reduce", action="store_true")
    add(
        "--trace",
        default=None,
        help="Chrome trace (JSON) of the last iteration's actions (registry "
        "schedules only); {schedule} is replaced by the schedule name",
    )
    add(
        "--check-host-syncs",
        action="store_true",
        help="fail if the forward-backward step makes a host sync after iteration 1 (CUDA: "
        "torch.cuda.set_sync_debug_mode('error'); everywhere: a count of the calls known to sync)",
    )
    add(
        "--measure-memory",
        action="store_true",
        help="log each rank's peak memory during the last iteration's forward-backward step "
        "(CUDA: max_memory_allocated; CPU: bytes counted by torch's profiler)",
    )
    add(
        "--save-params",
        default=None,
        help="torch.save {'parameters', 'first_gradients', 'lm_loss'} "
        "after training; {schedule} is replaced by the schedule name",
    )
    return parser


def validate_args(args: argparse.Namespace, world_size: int) -> list[RunPlan]:
    """Check every rule that needs no process group; raise ArgumentsError naming the setting.

    ``--pipeline-schedule`` may list several schedules (comma separated): they run one after
    the other in one process group, each from the same initial weights and data.
    """
    schedules = [name.strip() for name in args.pipeline_schedule.split(",") if name.strip()]
    _require(bool(schedules), "--pipeline-schedule needs at least one schedule name")
    _require(
        args.trace is None or any(name not in MEGATRON_SCHEDULES for name in schedules),
        f"--trace records the runtime executor; --pipeline-schedule {args.pipeline_schedule} "
        f"does not use it (megatron-core's own functions are not traced)",
    )
    if len(schedules) > 1:
        for flag, value in (("--save-params", args.save_params), ("--trace", args.trace)):
            _require(
                value is None or "{schedule}" in value,
                f"{flag} {value} must contain {{schedule}} when several schedules run",
            )
    if len(schedules) > 1:
        # a virtual size given for a list applies to the schedules that take one
        takes_vp = [
            name
            for name in schedules
            if name == "megatron-interleaved" or (name in names() and "vp" in get(name).options)
        ]
        _require(
            bool(takes_vp) or _virtual_size(args, args.pipeline_model_parallel_size) is None,
            "--virtual-pipeline-model-parallel-size: no listed schedule takes a virtual size",
        )
        return [
            _validate_schedule(_without_virtual_size(args, name not in takes_vp), world_size, name)
            for name in schedules
        ]
    return [_validate_schedule(args, world_size, schedules[0])]


def _without_virtual_size(args: argparse.Namespace, drop: bool) -> argparse.Namespace:
    if not drop:
        return args
    return argparse.Namespace(
        **{
            **vars(args),
            "virtual_pipeline_model_parallel_size": None,
            "num_layers_per_virtual_pipeline_stage": None,
        }
    )


def _validate_schedule(args: argparse.Namespace, world_size: int, schedule: str) -> RunPlan:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _require(tp >= 1 and pp >= 1, "--tensor/--pipeline-model-parallel-size must be >= 1")
    _require(
        world_size % (tp * pp) == 0,
        f"world size {world_size} must be divisible by "
        f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}",
    )
    dp = world_size // (tp * pp)
    per_step = args.micro_batch_size * dp
    _require(
        args.global_batch_size % per_step == 0,
        f"--global-batch-size {args.global_batch_size} must be divisible by "
        f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}",
    )
    _check_model_shape(args, tp)
    _require(not (args.bf16 and args.fp16), "--bf16 and --fp16 exclude each other")
    num_microbatches = args.global_batch_size // per_step
    placement, options, virtual_size = _resolve_schedule(args, schedule, pp, num_microbatches)
    stages = placement.stages_per_pipeline
    _require(
        args.num_layers % stages == 0,
        f"--num-layers {args.num_layers} must be divisible by the "
        f"{stages} stages per pipeline of {schedule} (placement {placement.kind}, PP={pp})",
    )
    return RunPlan(
        world_size,
        dp,
        num_microbatches,
        schedule,
        tuple(sorted(options.items())),
        placement,
        virtual_size,
    )


def _resolve_schedule(
    args: argparse.Namespace, schedule: str, pp: int, num_microbatches: int
) -> tuple[Placement, dict[str, Any], int | None]:
    """(placement, registry options, megatron-interleaved's virtual size) of one schedule."""
    vp = _virtual_size(args, pp)
    if schedule == "none":
        _require(
            pp == 1, f"--pipeline-schedule none needs --pipeline-model-parallel-size 1, got {pp}"
        )
        return looped(1, 1), {}, None
    if schedule == "megatron-1f1b":
        _require(vp is None, "--pipeline-schedule megatron-1f1b takes no virtual pipeline size")
        return looped(pp, 1), {}, None
    if schedule == "megatron-interleaved":
        _require(
            vp is not None,
            "--pipeline-schedule megatron-interleaved needs "
            "--virtual-pipeline-model-parallel-size or --num-layers-per-virtual-pipeline-stage",
        )
        group = args.microbatch_group_size_per_virtual_pipeline_stage
        _plan("interleaved-1f1b", pp, num_microbatches, {"vp": vp, "microbatch_group_size": group})
        return looped(pp, vp), {}, vp
    options = _registry_options(args, schedule, vp)
    return _plan(schedule, pp, num_microbatches, options).placement, options, None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentsError(message)


def _check_model_shape(args: argparse.Namespace, tp: int) -> None:
    _require(
        args.hidden_size % args.num_attention_heads == 0,
        f"--hidden-size {args.hidden_size} "
        f"must be divisible by --num-attention-heads {args.num_attention_heads}",
    )
    _require(
        args.num_attention_heads % tp == 0,
        f"--num-attention-heads {args.num_attention_heads} "
        f"must be divisible by --tensor-model-parallel-size {tp}",
    )
    _require(
        args.vocab_size % tp == 0,
        f"--vocab-size {args.vocab_size} must be divisible by --tensor-model-parallel-size {tp}",
    )
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    _require(
        ffn % tp == 0,
        f"--ffn-hidden-size {ffn} must be divisible by --tensor-model-parallel-size {tp}",
    )
    _require(
        not args.sequence_parallel or tp > 1,
        "--sequence-parallel needs --tensor-model-parallel-size > 1",
    )
    _require(
        not args.sequence_parallel or args.seq_length % tp == 0,
        f"--seq-length {args.seq_length} "
        f"must be divisible by --tensor-model-parallel-size {tp} with --sequence-parallel",
    )
    max_positions = args.max_position_embeddings or args.seq_length
    _require(
        args.seq_length <= max_positions,
        f"--seq-length {args.seq_length} exceeds --max-position-embeddings {max_positions}",
    )


def _virtual_size(args: argparse.Namespace, pp: int) -> int | None:
    vp, per_stage = (
        args.virtual_pipeline_model_parallel_size,
        args.num_layers_per_virtual_pipeline_stage,
    )
    if per_stage is None:
        return vp
    _require(
        vp is None,
        "give only one of --virtual-pipeline-model-parallel-size and "
        "--num-layers-per-virtual-pipeline-stage",
    )
    layers_per_rank = args.num_layers // pp
    _require(
        args.num_layers % pp == 0 and layers_per_rank % per_stage == 0,
        f"--num-layers "
        f"{args.num_layers} / --pipeline-model-parallel-size {pp} must be divisible by "
        f"--num-layers-per-virtual-pipeline-stage {per_stage}",
    )
    return layers_per_rank // per_stage


def _registry_options(args: argparse.Namespace, schedule: str, vp: int | None) -> dict[str, Any]:
    known = names()
    _require(
        schedule in known,
        f"--pipeline-schedule {schedule!r} is unknown; choose one of "
        f"{', '.join(known + list(MEGATRON_SCHEDULES))}",
    )
    accepted = get(schedule).options
    options: dict[str, Any] = {}
    group = args.microbatch_group_size_per_virtual_pipeline_stage
    for option, value, flag in (
        ("vp", vp, "--virtual-pipeline-model-parallel-size"),
        ("microbatch_group_size", group, "--microbatch-group-size-per-virtual-pipeline-stage"),
    ):
        if value is None:
            continue
        _require(option in accepted, f"{flag} is not an option of --pipeline-schedule {schedule}")
        options[option] = value
    return options


def _plan(schedule: str, pp: int, num_microbatches: int, options: dict[str, Any]) -> Any:
    try:
        return build(schedule, pp, num_microbatches, **options)
    except ScheduleConfigError as error:
        raise ArgumentsError(
            f"{error} (--pipeline-model-parallel-size {pp}, {num_microbatches} "
            f"microbatches per data-parallel rank)"
        ) from error


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m megatron_bitpipe.train`` (with or without torchrun)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plans = validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    except ArgumentsError as error:
        parser.error(str(error))
    from megatron_bitpipe.mcore import training

    _set_up_process_environment()
    return training.run(args, plans)


def _set_up_process_environment() -> None:
    """Defaults for a single process started without torchrun."""
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


if __name__ == "__main__":
    sys.exit(main())
