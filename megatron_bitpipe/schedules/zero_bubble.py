"""ZB-H1 (Qi et al., arXiv 2401.10241, section 3): 1F1B with the backward split into I and W.

I (input gradient) stays on the critical path; W (weight gradient) of rank r is delayed by r
microbatches, so it fills the cool-down bubble. Rank r runs min(D-r, N) warm-up forwards, then per
microbatch ``I(i) [W(i-r)] [F(next)]``, then the remaining Ws. No rank holds more than 1F1B's
rank 0, min(D, N) activations (each freed by its W); idle time per rank is (D-1)(F+I-W) when W is
no costlier than F and I.

    D=4, N=8 (the zero-bubble fork's ZB-H1 order; I written B there)
    rank 0 | F0 F1 F2 F3 I0 W0 F4 I1 W1 F5 I2 W2 F6 I3 W3 F7 I4 W4 I5 W5 I6 W6 I7 W7
    rank 3 | F0 I0 F1 I1 F2 I2 F3 I3 W0 F4 I4 W1 F5 I5 W2 F6 I6 W3 F7 I7 W4 W5 W6 W7
"""

from __future__ import annotations

from megatron_bitpipe.schedules.ir import Action, F, I, Schedule, W
from megatron_bitpipe.schedules.placement import looped
from megatron_bitpipe.schedules.registry import ScheduleSpec, register

NAME = "zb-h1"


def check(num_ranks: int, num_microbatches: int, **options: object) -> None:
    """ZB-H1 takes any --pp >= 1 and --microbatches >= 1 (the warm-up is capped at N)."""


def generate(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-H1 on ``looped(num_ranks)``."""
    programs = tuple(_rank_program(num_ranks, rank, num_microbatches) for rank in range(num_ranks))
    return Schedule(
        name=NAME,
        placement=looped(num_ranks),
        num_microbatches=num_microbatches,
        microbatch_pipeline=(0,) * num_microbatches,
        programs=programs,
    )


def _rank_program(num_ranks: int, rank: int, num_microbatches: int) -> tuple[Action, ...]:
    num_warmup = min(num_ranks - rank, num_microbatches)
    delay = rank
    # warm-up: F0 .. F(D-r-1)
    program = [F(rank, microbatch) for microbatch in range(num_warmup)]
    next_forward = num_warmup
    # steady and cool-down: I(i) W(i-r) F(next)
    for microbatch in range(num_microbatches):
        program.append(I(rank, microbatch))
        if microbatch >= delay:
            program.append(W(rank, microbatch - delay))
        if next_forward < num_microbatches:
            program.append(F(rank, next_forward))
            next_forward += 1
    # drain: the last r weight gradients
    first_pending = max(num_microbatches - delay, 0)
    program += [W(rank, microbatch) for microbatch in range(first_pending, num_microbatches)]
    return tuple(program)


register(
    ScheduleSpec(
        name=NAME,
        generate=generate,
        check=check,
        summary="ZB-H1: 1F1B with I/W split, W delayed by the rank; 1F1B memory",
    )
)
