"""1F1B and megatron-core's interleaved 1F1B, op for op as megatron-core 0.16.1 runs them.

``1f1b`` is PipeDream-flush, megatron's ``forward_backward_pipelining_without_interleaving``:
rank r runs min(D-1-r, N) warm-up forwards, then one forward and one backward in turn, then the
remaining backwards. Rank 0 holds min(D, N) activations at its peak.

    D=4, N=8, rank 0 | F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7
              rank 3 | F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7

``interleaved-1f1b`` is ``forward_backward_pipelining_with_interleaving`` on ``looped(D, vp)``:
the forward order walks megatron's ``get_schedule_table`` (groups of ``microbatch_group_size``
microbatches, each group through chunk 0, then chunk 1, ...); the k-th backward takes the k-th
table entry with the chunk mirrored. Rank r runs ``2(D-1-r) + (vp-1) * group`` warm-up forwards
(capped at vp*N), then F B in turn, then the rest. ``group = N`` gives megatron's breadth-first
chunk order; the default ``group = D`` is its depth-first order.

    D=4, vp=2, N=8, group 4, rank 0 (stage 4 = chunk 1)
    0F0 0F1 0F2 0F3 4F0 4F1 4F2 4F3 0F4 0F5 0F6 4B0 0F7 4B1 4F4 4B2 4F5 4B3 4F6 0B0 4F7 0B1 ...
"""

from __future__ import annotations

from megatron_bitpipe.schedules.errors import ScheduleConfigError
from megatron_bitpipe.schedules.ir import Action, B, F, Schedule
from megatron_bitpipe.schedules.placement import looped
from megatron_bitpipe.schedules.registry import ScheduleSpec, register

INTERLEAVED = "interleaved-1f1b"


def one_f_one_b_order(
    forwards: list[Action], backwards: list[Action], num_warmup: int
) -> tuple[Action, ...]:
    """Megatron's three phases over a rank's forward and backward sequences (equal lengths)."""
    num_steady = len(forwards) - num_warmup
    # warm-up: F0 .. F(w-1)
    program = list(forwards[:num_warmup])
    # steady: F(w+k) B(k)
    for k in range(num_steady):
        program += [forwards[num_warmup + k], backwards[k]]
    # cool-down: B(N-w) .. B(N-1)
    program += backwards[num_steady:]
    return tuple(program)


# --- 1f1b ----------------------------------------------------------------------------------


def check_1f1b(num_ranks: int, num_microbatches: int, **options: object) -> None:
    """1F1B takes any --pp >= 1 and --microbatches >= 1 (the warm-up is capped at N)."""


def generate_1f1b(num_ranks: int, num_microbatches: int) -> Schedule:
    """PipeDream-flush 1F1B on ``looped(num_ranks)``."""
    programs = []
    for rank in range(num_ranks):
        forwards = [F(rank, microbatch) for microbatch in range(num_microbatches)]
        backwards = [B(rank, microbatch) for microbatch in range(num_microbatches)]
        num_warmup = min(num_ranks - 1 - rank, num_microbatches)
        programs.append(one_f_one_b_order(forwards, backwards, num_warmup))
    return Schedule(
        name="1f1b",
        placement=looped(num_ranks),
        num_microbatches=num_microbatches,
        microbatch_pipeline=(0,) * num_microbatches,
        programs=tuple(programs),
    )


# --- interleaved-1f1b ----------------------------------------------------------------------


def schedule_table(num_microbatches: int, vp: int, group: int) -> list[tuple[int, int]]:
    """megatron-core's ``get_schedule_table``: ``(microbatch, chunk)`` per virtual microbatch.

    Groups of ``group`` microbatches, each run through chunk 0..vp-1; the last group takes every
    microbatch left (so it may be longer than ``group``).
    """
    table: list[tuple[int, int]] = []
    for first in range(0, num_microbatches, group):
        last = num_microbatches if first + group >= num_microbatches else first + group
        table += [(microbatch, chunk) for chunk in range(vp) for microbatch in range(first, last)]
    return table


def interleaved_warmup(
    num_ranks: int, rank: int, num_microbatches: int, vp: int, group: int
) -> int:
    """megatron-core's ``get_pp_rank_microbatches`` warm-up: 2(D-1-r) + (vp-1)*group, capped."""
    return min(2 * (num_ranks - 1 - rank) + (vp - 1) * group, vp * num_microbatches)


def check_interleaved(
    num_ranks: int, num_microbatches: int, vp: int = 2, microbatch_group_size: int | None = None
) -> None:
    """megatron-core 0.16.1's rules: --pp >= 2, --vp >= 2, group in [D, N], N % group 0 or >= D."""
    if num_ranks < 2:
        raise ScheduleConfigError(
            INTERLEAVED,
            "pp",
            num_ranks,
            "must be >= 2: megatron-core interleaves chunks only with pipeline parallelism",
        )
    if vp < 2:
        raise ScheduleConfigError(
            INTERLEAVED, "vp", vp, "must be >= 2 (with one chunk per rank use 1f1b)"
        )
    group = num_ranks if microbatch_group_size is None else microbatch_group_size
    if num_microbatches < num_ranks:
        raise ScheduleConfigError(
            INTERLEAVED,
            "microbatches",
            num_microbatches,
            "must be >= {pp}: megatron-core runs each chunk on groups of at least PP microbatches "
            "(microbatch_group_size_per_vp_stage in [PP, M])",
            pp=num_ranks,
        )
    if not num_ranks <= group <= num_microbatches:
        raise ScheduleConfigError(
            INTERLEAVED,
            "microbatch_group_size",
            group,
            "must lie in [{pp}, {microbatches}] (megatron-core's "
            "microbatch_group_size_per_vp_stage rule)",
            pp=num_ranks,
            microbatches=num_microbatches,
        )
    remainder = num_microbatches % group
    if 0 < remainder < num_ranks:
        raise ScheduleConfigError(
            INTERLEAVED,
            "microbatches",
            num_microbatches,
            f"modulo {{microbatch_group_size}} is {remainder}; it must be 0 or >= {{pp}}, or the "
            "last group stalls on its dependencies (megatron-core rule)",
            microbatch_group_size=group,
            pp=num_ranks,
        )


def generate_interleaved(
    num_ranks: int, num_microbatches: int, vp: int = 2, microbatch_group_size: int | None = None
) -> Schedule:
    """megatron-core's depth-first interleaved 1F1B on ``looped(num_ranks, vp)``."""
    group = num_ranks if microbatch_group_size is None else microbatch_group_size
    table = schedule_table(num_microbatches, vp, group)
    programs = []
    for rank in range(num_ranks):
        # the k-th backward takes table entry k with its chunk mirrored
        forwards = [F(chunk * num_ranks + rank, microbatch) for microbatch, chunk in table]
        backwards = [
            B((vp - 1 - chunk) * num_ranks + rank, microbatch) for microbatch, chunk in table
        ]
        num_warmup = interleaved_warmup(num_ranks, rank, num_microbatches, vp, group)
        programs.append(one_f_one_b_order(forwards, backwards, num_warmup))
    return Schedule(
        name=INTERLEAVED,
        placement=looped(num_ranks, vp),
        num_microbatches=num_microbatches,
        microbatch_pipeline=(0,) * num_microbatches,
        programs=tuple(programs),
        options=(("vp", vp), ("microbatch_group_size", group)),
    )


register(
    ScheduleSpec(
        name="1f1b",
        generate=generate_1f1b,
        check=check_1f1b,
        summary="1F1B (PipeDream-flush), megatron-core's non-interleaved order",
    )
)
register(
    ScheduleSpec(
        name=INTERLEAVED,
        generate=generate_interleaved,
        check=check_interleaved,
        summary="megatron-core's interleaved 1F1B on vp chunks per rank (depth-first by default)",
        options=("vp", "microbatch_group_size"),
    )
)
