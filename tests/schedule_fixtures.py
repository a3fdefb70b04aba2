"""Hand-written schedules the core tests use, independent of the generators."""

from __future__ import annotations

from megatron_bitpipe.schedules import placement
from megatron_bitpipe.schedules.ir import B, F, Schedule


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """PipeDream-flush 1F1B on one stage per rank."""
    programs = []
    for rank in range(num_ranks):
        warmup = min(num_ranks - rank - 1, num_microbatches)
        program = [F(rank, microbatch) for microbatch in range(warmup)]
        next_forward = warmup
        for microbatch in range(num_microbatches):
            if next_forward < num_microbatches:
                program.append(F(rank, next_forward))
                next_forward += 1
            program.append(B(rank, microbatch))
        programs.append(tuple(program))
    return Schedule("1f1b", placement.looped(num_ranks), num_microbatches, (0,) * num_microbatches, tuple(programs))


def vshape_gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """All forwards then all backwards on the V placement (rank r: stages r, 2D-1-r)."""
    layout = placement.vshape(num_ranks)
    last = 2 * num_ranks - 1
    programs = []
    for rank in range(num_ranks):
        down, up = rank, last - rank
        forwards = [F(stage, m) for stage in (down, up) for m in range(num_microbatches)]
        backwards = [B(stage, m) for stage in (up, down) for m in range(num_microbatches)]
        programs.append(tuple(forwards + backwards))
    return Schedule("v-gpipe", layout, num_microbatches, (0,) * num_microbatches, tuple(programs))


def bidirectional_gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """Chimera placement, microbatches alternating down/up, all forwards then all backwards."""
    layout = placement.chimera(num_ranks)
    pipelines = tuple(microbatch % 2 for microbatch in range(num_microbatches))
    programs = []
    for rank in range(num_ranks):
        stages = layout.rank_stages[rank]
        forwards = [
            F(stage, m) for m in range(num_microbatches) for stage in stages
            if layout.pipeline_of(stage) == pipelines[m]
        ]
        backwards = [
            B(stage, m) for m in range(num_microbatches) for stage in stages
            if layout.pipeline_of(stage) == pipelines[m]
        ]
        programs.append(tuple(forwards + backwards))
    return Schedule("bi-gpipe", layout, num_microbatches, pipelines, tuple(programs))
