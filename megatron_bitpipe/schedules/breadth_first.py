"""Breadth-first pipelining (Lamy-Poirier, arXiv 2211.05953) on the looped placement.

Each rank runs all N microbatches through its first local stage, then all of them through its next
local stage, ...; the backward mirrors it: last local stage first, microbatches in reverse. This is
torch.distributed.pipelining's ScheduleLoopedBFS order. Every stage's gradient is complete in one
block, so its data-parallel reduction can start early (the paper's point).

    D=2, vp=2, N=2 (stages r and r+2 on rank r)
    rank 0 | 0F0 0F1 2F0 2F1 .   .   2B1 2B0 0B1 0B0
    rank 1 | .   1F0 1F1 3F0 3F1 3B1 3B0 1B1 1B0

Bubble with F=B: (D-1)/(vN+D-1). Rank 0 holds vN chunk activations at its peak.
"""

from __future__ import annotations

from megatron_bitpipe.schedules.errors import ScheduleConfigError
from megatron_bitpipe.schedules.ir import Action, B, F, Schedule
from megatron_bitpipe.schedules.placement import looped
from megatron_bitpipe.schedules.registry import ScheduleSpec, register

NAME = "breadth-first"


def check(num_ranks: int, num_microbatches: int, vp: int = 2) -> None:
    """--vp >= 1 and --microbatches >= --pp."""
    if vp < 1:
        raise ScheduleConfigError(NAME, "vp", vp, "must be >= 1")
    if num_microbatches < num_ranks:
        raise ScheduleConfigError(
            NAME,
            "microbatches",
            num_microbatches,
            "must be >= {pp}: microbatch 0 comes back to a rank for its next local stage D "
            "stage-times after it left, so with fewer microbatches than ranks every loop stalls "
            "(torch's LoopedBFS rule too)",
            pp=num_ranks,
        )


def generate(num_ranks: int, num_microbatches: int, vp: int = 2) -> Schedule:
    """Breadth-first order on ``looped(num_ranks, vp)``."""
    programs = tuple(
        _rank_program(num_ranks, rank, num_microbatches, vp) for rank in range(num_ranks)
    )
    return Schedule(
        name=NAME,
        placement=looped(num_ranks, vp),
        num_microbatches=num_microbatches,
        microbatch_pipeline=(0,) * num_microbatches,
        programs=programs,
        options=(("vp", vp),),
    )


def _rank_program(num_ranks: int, rank: int, num_microbatches: int, vp: int) -> tuple[Action, ...]:
    stages = [chunk * num_ranks + rank for chunk in range(vp)]
    microbatches = range(num_microbatches)
    # forward, stage by stage: s0:F0..F(N-1)  s1:F0..F(N-1)  ...
    forwards = [F(stage, microbatch) for stage in stages for microbatch in microbatches]
    # backward, mirrored: s(vp-1):B(N-1)..B0  ...  s0:B(N-1)..B0
    backwards = [
        B(stage, microbatch) for stage in reversed(stages) for microbatch in reversed(microbatches)
    ]
    return tuple(forwards + backwards)


register(
    ScheduleSpec(
        name=NAME,
        generate=generate,
        check=check,
        summary="breadth-first looped pipeline: all microbatches per local stage (torch LoopedBFS)",
        options=("vp",),
    )
)
