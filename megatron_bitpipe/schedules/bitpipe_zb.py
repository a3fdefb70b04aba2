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
"""

from __future__ import annotations

from megatron_bitpipe.schedules import bitpipe
from megatron_bitpipe.schedules.ir import Schedule
from megatron_bitpipe.schedules.placement import bitpipe as bitpipe_placement
from megatron_bitpipe.schedules.registry import ScheduleSpec, register
from megatron_bitpipe.schedules.weight_fill import fill

NAME = "bitpipe-zb"


def check(num_ranks: int, num_microbatches: int, **options: object) -> None:
    """bitpipe's rules: D even, N a multiple of D."""
    bitpipe.check_replica_pairs(NAME, num_ranks, num_microbatches)


def generate(num_ranks: int, num_microbatches: int) -> Schedule:
    """The official BitPipe order with its backwards split and the Ws filling its bubbles."""
    programs = bitpipe.official_programs(num_ranks, num_microbatches)
    placement = bitpipe_placement(num_ranks)
    filled = fill(placement, programs, num_microbatches, cap=2 * num_ranks)
    return Schedule(
        NAME,
        placement,
        num_microbatches,
        bitpipe.microbatch_pipelines(num_ranks, num_microbatches),
        filled,
    )


register(
    ScheduleSpec(
        name=NAME,
        generate=generate,
        check=check,
        summary="zero-bubble BitPipe: the official order with I/W split, Ws filling its bubbles",
        bidirectional=True,
        chunks_per_rank=4,
    )
)
