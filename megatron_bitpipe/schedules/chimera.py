"""Chimera (Li & Hoefler, SC'21): two pipelines on ``placement.chimera``, each running 1F1B.

Rank r holds down stage r and up stage D-1-r, so the replicas of a stage pair rank r with rank
D-1-r. Microbatches go in blocks of D/2, alternating down/up (m goes down iff m % D < D/2).
Like Chimera's generator (``AutoGeneratePipelineRank``), each pipeline injects a microbatch every
2 slots and moves one rank per slot (F = B = 1 slot); the i-th microbatch of unit u (D per unit)
in either pipeline, at pipeline position s::

    F in slot 2D*u + 2i + s,    B in slot 2D*u + 2i + 2D-1-s

Down and up never claim the same slot of a rank, and unit u+1 starts 2D slots after unit u
("direct concatenation"). Each rank runs its actions in slot order. D=4, N=4 (a reference
generator's slot table, 1-based microbatches and stages)::

    slot 0     1     2     3     4     5     6     7     8     9
    P1   F1d1    .   F2d1  F3u4  B3u4  F4u4  B4u4  B1d1    .   B2d1
    P4   F3u1    .   F4u1  F1d4  B1d4  F2d4  B2d4  B3u1    .   B4u1

With t_B = t_F the bubble is (D-2)/(2N+D-2).
"""

from __future__ import annotations

from megatron_bitpipe.schedules.bitpipe import check_replica_pairs, microbatch_pipelines
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule
from megatron_bitpipe.schedules.placement import chimera as chimera_placement
from megatron_bitpipe.schedules.registry import ScheduleSpec, register


def check(num_ranks: int, num_microbatches: int, **options: object) -> None:
    """Raise ScheduleConfigError unless D is even and N a multiple of D."""
    check_replica_pairs("chimera", num_ranks, num_microbatches)


def slot(num_ranks: int, index: int, position: int, kind: Kind) -> int:
    """Slot of the ``index``-th microbatch of a pipeline at ``position`` (module docstring)."""
    unit, within = divmod(index, num_ranks // 2)
    first = 2 * num_ranks * unit + 2 * within
    return first + (position if kind is Kind.F else 2 * num_ranks - 1 - position)


def _program(num_ranks: int, rank: int, pipelines: tuple[int, ...]) -> tuple[Action, ...]:
    layout = chimera_placement(num_ranks)
    timed = []
    for stage in layout.rank_stages[rank]:
        pipeline = layout.pipeline_of(stage)
        position = layout.position(stage)
        members = [m for m, flows in enumerate(pipelines) if flows == pipeline]
        for index, microbatch in enumerate(members):
            for kind in (Kind.F, Kind.B):
                action = Action(stage, kind, microbatch)
                timed.append((slot(num_ranks, index, position, kind), action))
    timed.sort(key=lambda entry: entry[0])
    return tuple(action for _, action in timed)


def generate(num_ranks: int, num_microbatches: int) -> Schedule:
    """Chimera with direct concatenation: every rank runs its actions in slot order."""
    pipelines = microbatch_pipelines(num_ranks, num_microbatches)
    return Schedule(
        "chimera",
        chimera_placement(num_ranks),
        num_microbatches,
        pipelines,
        tuple(_program(num_ranks, rank, pipelines) for rank in range(num_ranks)),
    )


register(
    ScheduleSpec(
        name="chimera",
        generate=generate,
        check=check,
        summary="Chimera: two replicas, down and up 1F1B merged (SC'21), direct concatenation",
        bidirectional=True,
        chunks_per_rank=2,
    )
)
