"""GPipe (Huang et al., arXiv 1811.06965): every forward, then every backward, one stage per rank.

    D=4, N=4 (F=B=1)
    rank 0 | F0 F1 F2 F3 .  .  .  .  .  .  B0 B1 B2 B3
    rank 3 | .  .  .  F0 F1 F2 F3 B0 B1 B2 B3

Backwards run in forward order, as torch.distributed.pipelining's ScheduleGPipe does. Every rank
holds all N activations at its peak. Bubble with F=B: (D-1)/(N+D-1).
"""

from __future__ import annotations

from megatron_bitpipe.schedules.ir import Action, B, F, Schedule
from megatron_bitpipe.schedules.placement import looped
from megatron_bitpipe.schedules.registry import ScheduleSpec, register


def check(num_ranks: int, num_microbatches: int, **options: object) -> None:
    """GPipe takes any --pp >= 1 and --microbatches >= 1 (checked by the registry)."""


def generate(num_ranks: int, num_microbatches: int) -> Schedule:
    """All-forward-all-backward on ``looped(num_ranks)``."""
    programs = tuple(_rank_program(rank, num_microbatches) for rank in range(num_ranks))
    return Schedule(
        name="gpipe",
        placement=looped(num_ranks),
        num_microbatches=num_microbatches,
        microbatch_pipeline=(0,) * num_microbatches,
        programs=programs,
    )


def _rank_program(rank: int, num_microbatches: int) -> tuple[Action, ...]:
    microbatches = range(num_microbatches)
    # forward: F0 F1 ... F(N-1)
    forwards = [F(rank, microbatch) for microbatch in microbatches]
    # backward: B0 B1 ... B(N-1)
    backwards = [B(rank, microbatch) for microbatch in microbatches]
    return tuple(forwards + backwards)


register(
    ScheduleSpec(
        name="gpipe",
        generate=generate,
        check=check,
        summary="GPipe: all forwards then all backwards; holds N activations per rank",
    )
)
