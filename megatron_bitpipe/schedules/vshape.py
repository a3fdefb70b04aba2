"""V-shape schedules with controllable memory: V-Min, V-Half and V-ZB (arXiv 2405.15362).

Placement ``vshape(D)``: rank r holds stage r of the down leg and stage 2D-1-r of the up leg, so
a microbatch runs down the ranks and back up; the turn D-1 -> D is local to rank D-1 and the loss
is on rank 0. The backward is split into I (input gradient, on the critical path) and W (weight
gradient, free to float). Per rank, ``F``/``f`` are the forwards of its down/up-leg stage,
``I``/``i`` their input gradients and ``W``/``w`` their weight gradients.

All three plan with unit costs (F = I = W, no communication time), as the paper's tables do; other
costs keep the orders valid but not their bubble figures. Memory is counted in chunk activations,
+1 at F and -1 at W; 1F1B holds 2D.

V-Min and V-Half use the paper's building-block method (Section 3.1 and Appendix A, as the
fork's ``v_auto_schedule.py`` cites them):
  1. building block: the slots of one microbatch's F f i I on every rank (``_block``);
  2. repeat: microbatch m's block shifted by 6m slots, one rank's work per microbatch;
  3. W fills free slots, oldest first (implicit while planning, see ``_Timeline``);
  4. reorder: warm-up and cool-down actions move to the earliest free slot their inputs allow
     when the rank's peak stays within the repeated plan's peak;
  5. squeeze: the simulator and the executor run each rank's order as soon as inputs arrive.
Peak: V-Min 2*floor((D+4)/3), V-Half 2*floor((D+2)/2) chunk activations. The bubble is at most the
fork's (``zbv_greedy.py``, D <= 8, any N) except V-Min with 3 | D, one slot more: the fork reorders
twice, with a squeeze between, we once.

V-ZB holds 2D (as 1F1B) and has no bubble inside any rank's span for N >= 2D-1 (the start skew of
D-1 slots remains). Warm-up and steady state are closed-form phases per rank; the cool-down is
greedy. The orders equal those of the fork's greedy ``try_v_schedule`` with max_mem = 2D
(sail-sg/zero-bubble-pipeline-parallelism, ``zbv.py``).

Speed (D=64, N=1024 is 393k actions): the planners go slot by slot only through the warm-up and
the cool-down, O(D) slots per rank. In between, every rank repeats the same six slots with each
microbatch one higher; once the whole planning state has come round (the same counts, the same
actions one microbatch later) they skip to the cool-down and write the repeats in bulk
(``_PeriodicProgram``). Why each skip is exact is noted where it happens (``_RepeatedPlan.peak``,
``_ProgramWriter.write_steady``, ``_zb_steady_periods``).
"""

from __future__ import annotations

from megatron_bitpipe.schedules.registry import ScheduleSpec, register
from megatron_bitpipe.schedules.vshape_block import (
    _RepeatedPlan,
    check_v_shape,
    generate_v_half,
    generate_v_min,
)
from megatron_bitpipe.schedules.vshape_common import (
    DOWN,
    FORWARD,
    INPUT_GRAD,
    SLOTS_PER_MICROBATCH,
    UP,
    State,
    _actions,
    _new_action,
    _no_gc,
    _PeriodicProgram,
    _shifted,
)
from megatron_bitpipe.schedules.vshape_zb import (
    _zb_steady_periods,
    check_v_zb,
    generate_v_zb,
)

__all__ = [
    "DOWN",
    "FORWARD",
    "INPUT_GRAD",
    "SLOTS_PER_MICROBATCH",
    "UP",
    "State",
    "_PeriodicProgram",
    "_RepeatedPlan",
    "_actions",
    "_new_action",
    "_no_gc",
    "_shifted",
    "_zb_steady_periods",
    "check_v_shape",
    "check_v_zb",
    "generate_v_half",
    "generate_v_min",
    "generate_v_zb",
]

register(
    ScheduleSpec(
        name="v-min",
        generate=generate_v_min,
        check=check_v_shape,
        summary="V-shape with about 1/3 of 1F1B's activation memory (arXiv 2405.15362)",
        chunks_per_rank=2,
    )
)
register(
    ScheduleSpec(
        name="v-half",
        generate=generate_v_half,
        check=check_v_shape,
        summary="V-shape with about 1/2 of 1F1B's activation memory (arXiv 2405.15362)",
        chunks_per_rank=2,
    )
)
register(
    ScheduleSpec(
        name="v-zb",
        generate=generate_v_zb,
        check=check_v_zb,
        summary="V-shape zero bubble with 1F1B's activation memory (arXiv 2405.15362)",
        chunks_per_rank=2,
    )
)
