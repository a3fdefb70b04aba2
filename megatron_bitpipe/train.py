"""Train a megatron-core GPT on mock data with any pipeline schedule (CPU/gloo or GPU/NCCL).

    torchrun --nproc-per-node 4 -m megatron_bitpipe.train --pipeline-model-parallel-size 4 \\
        --pipeline-schedule bitpipe --num-layers 16 --global-batch-size 16 --train-iters 5

Argument names follow Megatron-LM. ``--pipeline-schedule`` takes every registry name, plus
``megatron-1f1b`` / ``megatron-interleaved`` (megatron-core's own functions) and ``none``
(PP=1, ``forward_backward_no_pipelining``: the single-process reference). Everything is checked
before any process group exists; errors name the setting and the rule.

``--report FILE.json`` writes what the run did (settings, every iteration's loss, grad norm and
step time, memory, the trace's path) as one JSON object for programs to read; its format is in
``megatron_bitpipe.run_report``. The log lines stay Megatron-LM's.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from megatron_bitpipe import train_args
from megatron_bitpipe.outputs import OutputError, prepare_output
from megatron_bitpipe.run_plan import ArgumentsError, RunPlan, validate_args
from megatron_bitpipe.runtime import rank_order
from megatron_bitpipe.scale.bench import PIN_VARIABLE

__all__ = ["ArgumentsError", "RunPlan", "main", "validate_args"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m megatron_bitpipe.train`` (with or without torchrun)."""
    args = train_args.build_parser().parse_args(argv)
    try:
        plans = validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))
        prepare_outputs(args, plans)
    except (ArgumentsError, OutputError) as error:
        train_args.fail(str(error))
    from megatron_bitpipe.mcore import training

    _set_up_process_environment()
    _pin_to_cores()
    world_size = int(os.environ["WORLD_SIZE"])
    pipeline_parallel = args.pipeline_model_parallel_size
    rank_order.apply_to_environment(pipeline_parallel, world_size // pipeline_parallel, args.pipeline_rank_order)
    return training.run(args, plans)


def prepare_outputs(args: argparse.Namespace, plans: Sequence[RunPlan]) -> None:
    """Create every output's folder and prove it writable now, before any process group."""
    if args.report:
        prepare_output(args.report, "--report", suffixes=(".json",))
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
