"""Zero-bubble BitPipe (``bitpipe-zb``): BitPipe with every backward split into I and W.

The placement, the two replicas, the microbatch directions and the order of forwards and input
gradients are the official BitPipe order's (``bitpipe-official``; each B becomes an I). The
weight gradients are placed by ``weight_fill``: a W runs where its rank would otherwise wait for
an input, or before a forward that would stash more than 2D chunk activations, and the rest once
the rank's forwards and input gradients are done. The official order idles (N/D + 1)(D - 2)
units per rank with F=1, B=2 because each of its units drains the pipeline; the pending Ws fill
those drains, so with F=I=W=1 a rank idles D/2 - 1 units whatever N (the wait for its first
input at the start, which no W can fill: min(r, D-1-r) for rank r), and stashes at most 2D chunk
activations, as ``bitpipe`` does.

``max_stash`` (D..3D chunk activations per rank; default: the order above, which stashes 2D)
caps the stash: the order is the one with the least idle (F=I=W=1) among the order above (from a
cap of 2D) and ``bitpipe``'s stretched pool orders (``bitpipe.Stretch``) with their Ws placed by
``weight_fill`` under their own F/B peak, whichever fit the cap. The pool of a larger cap holds
the pool of a smaller one, so idle never grows with the cap. Above 2D idle stays D/2 - 1 (the
order above already idles only the unfillable wait for the first input); below 2D the pool's
orders idle more, in a bubble per microbatch pair that grows with N.
"""

from __future__ import annotations

import functools

from megatron_bitpipe.schedules import bitpipe, gc_pause
from megatron_bitpipe.schedules.ir import Action, Schedule
from megatron_bitpipe.schedules.placement import bitpipe as bitpipe_placement
from megatron_bitpipe.schedules.registry import ScheduleSpec, register
from megatron_bitpipe.schedules.weight_fill import fill

NAME = "bitpipe-zb"


def check(num_ranks: int, num_microbatches: int, max_stash: int | None = None) -> None:
    """bitpipe's rules: D even, N a multiple of D; ``max_stash``, if given, in [D, 3D]."""
    bitpipe.check_replica_pairs(NAME, num_ranks, num_microbatches)
    bitpipe.check_stash(NAME, num_ranks, max_stash)


def default_programs(num_ranks: int, num_microbatches: int) -> tuple[tuple[Action, ...], ...]:
    """The official BitPipe order with its backwards split and the Ws filling its bubbles."""
    programs = bitpipe.official_programs(num_ranks, num_microbatches)
    placement = bitpipe_placement(num_ranks)
    return fill(placement, programs, num_microbatches, cap=2 * num_ranks)


@functools.lru_cache(maxsize=None)
def default_idle(num_ranks: int, num_microbatches: int) -> float:
    """Idle per rank (F=I=W=1) of ``default_programs``, simulated."""
    return bitpipe.simulated_idle(default_programs(num_ranks, num_microbatches), num_ranks, True)


def capped_programs(
    num_ranks: int, num_microbatches: int, max_stash: int
) -> tuple[tuple[tuple[Action, ...], ...], str]:
    """The order of the module docstring under ``max_stash`` and its name; idle compared at
    ``bitpipe.stash_eval_microbatches`` (ties: the default order)."""
    probe = bitpipe.stash_eval_microbatches(num_ranks, num_microbatches)
    stretched = bitpipe.best_stretch(num_ranks, num_microbatches, max_stash, split=True)
    if max_stash >= 2 * num_ranks and (
        stretched is None or default_idle(num_ranks, probe) <= stretched[0]
    ):
        return default_programs(num_ranks, num_microbatches), "official-filled"
    assert stretched is not None, "the serial order stashes 2 <= D"
    stretch = stretched[1]
    programs = bitpipe.stretched_programs(num_ranks, num_microbatches, stretch)
    placement = bitpipe_placement(num_ranks)
    filled = fill(placement, programs, num_microbatches, cap=bitpipe.stash_peak(programs))
    return filled, bitpipe.stretch_name(stretch)


def generate(num_ranks: int, num_microbatches: int, max_stash: int | None = None) -> Schedule:
    """The official BitPipe order with its backwards split and the Ws filling its bubbles; with
    ``max_stash``, ``capped_programs`` (at most ``max_stash`` chunk activations per rank)."""
    with gc_pause.paused():
        if max_stash is None:
            programs, options = default_programs(num_ranks, num_microbatches), ()
        else:
            programs, order = capped_programs(num_ranks, num_microbatches, max_stash)
            options = (("max_stash", max_stash), ("order", order))
    return Schedule(
        NAME,
        bitpipe_placement(num_ranks),
        num_microbatches,
        bitpipe.microbatch_pipelines(num_ranks, num_microbatches),
        programs,
        options,
    )


register(
    ScheduleSpec(
        name=NAME,
        generate=generate,
        check=check,
        summary="zero-bubble BitPipe: the official order with I/W split, Ws filling its bubbles",
        options=("max_stash",),
        bidirectional=True,
        chunks_per_rank=4,
    )
)
