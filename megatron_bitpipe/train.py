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
from typing import NoReturn

from megatron_bitpipe.outputs import OutputError, prepare_output
from megatron_bitpipe.run_plan import ArgumentsError, RunPlan, validate_args
from megatron_bitpipe.scale import rank_order
from megatron_bitpipe.scale.bench import PIN_VARIABLE

__all__ = ["ArgumentsError", "RunPlan", "build_parser", "main", "validate_args"]


PROG = "megatron_bitpipe.train"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), printed by rank 0 only, exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str) -> NoReturn:
    """One error line (from rank 0; every rank would print the same) and exit status 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n")[0])
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
    add(
        "--pipeline-rank-order",
        default="consecutive",
        help="consecutive (megatron's), or replica-pairs: pipeline ranks r and D-1-r in adjacent "
        "process slots (one node), as the official BitPipe code places them",
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
        help="0 by default; masks follow (seed, iteration, layer, microbatch), so any pipeline "
        "layout draws the single process's",
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
    add(
        "--recompute-granularity",
        choices=("full", "selective"),
        default=None,
        help="activation recomputation, as Megatron-LM: selective (core attention) or full",
    )
    add("--recompute-method", choices=("uniform", "block"), default=None, help="with full")
    add("--recompute-num-layers", type=int, default=None, help="with full: layers per group")
    add("--untie-embeddings-and-output-weights", action="store_true")
    add("--use-distributed-optimizer", action="store_true")
    add("--overlap-grad-reduce", action="store_true")
    add(
        "--trace",
        default=None,
        help="Chrome trace (FILE.json) of the last iteration's actions, and its timeline "
        "FILE.png (registry schedules only); {schedule} is replaced by the schedule name",
    )
    add(
        "--profile-step",
        default=None,
        help="measured costs of the steps (FILE.json; every iteration from the second to the last, "
        "or to the one before when --measure-memory takes the last): every action's wall, wait and "
        "CPU time per rank, the gradient-sync wait, the optimizer step, message and all-reduce "
        "calibrations; "
        "{schedule} is replaced by the schedule name (megatron-bitpipe bench reads it)",
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
        "--distributed-timeout-minutes",
        type=float,
        default=3.0,
        help="deadline of every set-up phase and collective (NCCL's default is 10)",
    )
    add(
        "--step-timeout-seconds",
        type=float,
        default=120.0,
        help="deadline of every action of a step (a message that does not come, an optimizer "
        "step that does not end): the rank exits naming what it waited on",
    )
    add("--exit-on-nan", action="store_true", help="stop at a non-finite loss or gradient")
    add(
        "--check-replicas-every",
        type=int,
        default=None,
        help="every K iterations, compare checksums of each stage's copies and stop if they differ",
    )
    add("--save", default=None, help="checkpoint folder (megatron-core distributed checkpoint)")
    add("--load", default=None, help="resume from the latest checkpoint in this folder")
    add("--save-interval", type=int, default=None, help="also save every N iterations")
    add(
        "--save-params",
        default=None,
        help="torch.save {'parameters', 'first_gradients', 'lm_loss'} "
        "after training; {schedule} is replaced by the schedule name",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m megatron_bitpipe.train`` (with or without torchrun)."""
    args = build_parser().parse_args(argv)
    try:
        plans = validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))
        prepare_outputs(args, plans)
    except (ArgumentsError, OutputError) as error:
        fail(str(error))
    from megatron_bitpipe.mcore import training

    _set_up_process_environment()
    _pin_to_cores()
    world_size = int(os.environ["WORLD_SIZE"])
    pipeline_parallel = args.pipeline_model_parallel_size
    rank_order.apply_to_environment(pipeline_parallel, world_size // pipeline_parallel, args.pipeline_rank_order)
    return training.run(args, plans)


def prepare_outputs(args: argparse.Namespace, plans: Sequence[RunPlan]) -> None:
    """Create every output's folder and prove it writable now, before any process group."""
    for plan in plans:
        if args.trace and plan.uses_registry:
            prepare_output(plan.output_path(args.trace), "--trace", suffixes=(".json",))
        if args.profile_step:
            prepare_output(plan.output_path(args.profile_step), "--profile-step", suffixes=(".json",))
        if args.save_params:
            prepare_output(plan.output_path(args.save_params), "--save-params")
        if args.save:
            prepare_output(plan.output_path(args.save), "--save", folder=True)


def _pin_to_cores() -> None:
    """Under ``PIN_VARIABLE=1`` (``scale.bench``), local rank r keeps cores [r*k, (r+1)*k) of the
    ones it may use (k = cores / local ranks); nothing when the ranks outnumber the cores."""
    if os.environ.get(PIN_VARIABLE) != "1" or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    share = len(cores) // max(local_ranks, 1)
    if share >= 1:
        os.sched_setaffinity(0, cores[local_rank * share : (local_rank + 1) * share])


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
