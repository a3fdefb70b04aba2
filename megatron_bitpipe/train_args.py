"""The command line of ``megatron_bitpipe.train``: its parser and its one-line errors.

Argument names follow Megatron-LM. Imports only the standard library, so the planning commands
(``scale``) read a trainer command line without torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from megatron_bitpipe.schedules.choice import MEGATRON_FUNCTIONS

PROG = "megatron_bitpipe.train"
DESCRIPTION = (
    "Train a megatron-core GPT on mock data with any pipeline schedule (CPU/gloo or GPU/NCCL)."
)


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
    """The trainer's parser; a bad argument prints one line (rank 0) and exits 2."""
    parser = _Parser(prog=PROG, description=DESCRIPTION)
    add = parser.add_argument
    add("--pipeline-model-parallel-size", type=int, default=1)
    add("--tensor-model-parallel-size", type=int, default=1)
    add("--virtual-pipeline-model-parallel-size", type=int, default=None)
    add("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    add("--microbatch-group-size-per-virtual-pipeline-stage", type=int, default=None)
    add(
        "--pipeline-schedule",
        default="1f1b",
        help=f"registry name or one of {', '.join(MEGATRON_FUNCTIONS)} (megatron-core's own "
        "functions); several: comma separated",
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
        "--report",
        default=None,
        help="the run as one JSON object (FILE.json; every schedule of a comma list in one "
        "file): settings, each iteration's loss, grad norm, step time and loss scale, peak "
        "memory, the trace's path; rewritten after every iteration (megatron_bitpipe.run_report "
        "describes the format)",
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
