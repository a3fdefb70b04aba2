"""The schedule IR: actions, schedules and the one dependency rule set every other part uses.

An action is ``(stage, kind, microbatch)`` written ``"{stage}{kind}{microbatch}"`` (``5F2``), the
same text torch.distributed.pipelining uses, so single-pipeline CSVs load there. Stages are global:
a single-direction schedule has stages ``0..S-1``; a bidirectional one adds the up pipeline as
``S..2S-1``. Each microbatch flows through exactly one pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator, NamedTuple

from megatron_bitpipe.schedules.placement import Placement


class Kind(str, Enum):
    """What an action does. Compute kinds come from generators; the rest only from ``lower``."""

    F = "F"
    """Forward of one microbatch through one stage."""
    B = "B"
    """Full backward: input and weight gradients."""
    I = "I"  # noqa: E741 - the name torch.distributed.pipelining uses
    """Input-gradient half of a split backward."""
    W = "W"
    """Weight-gradient half of a split backward."""
    SEND_F = "SEND_F"
    """Send this stage's output activation to the next stage's rank."""
    RECV_F = "RECV_F"
    """Post the receive of this stage's input activation from the previous stage's rank."""
    SEND_B = "SEND_B"
    """Send this stage's input gradient to the previous stage's rank."""
    RECV_B = "RECV_B"
    """Post the receive of this stage's output gradient from the next stage's rank."""
    REDUCE_GRAD = "REDUCE_GRAD"
    """Start the gradient sync of this stage with its replica (bidirectional) and data parallel."""


COMPUTE_KINDS = frozenset({Kind.F, Kind.B, Kind.I, Kind.W})
COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})

_ACTION_PATTERN = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|REDUCE_GRAD|F|B|I|W)(\d*)$")


class Action(NamedTuple):
    """One step of one rank: ``kind`` applied to ``stage`` for ``microbatch`` (None for REDUCE_GRAD).

    A named tuple, like torch.distributed.pipelining's ``_Action``: hashing and comparison run in
    C, which keeps validating a 64-rank, 1024-microbatch schedule well under a second.
    """

    stage: int
    kind: Kind
    microbatch: int | None = None

    def __str__(self) -> str:
        suffix = "" if self.microbatch is None else str(self.microbatch)
        return f"{self.stage}{self.kind.value}{suffix}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Inverse of ``str``: ``Action.parse("5F2") == Action(5, Kind.F, 2)``."""
        match = _ACTION_PATTERN.match(text.strip())
        if match is None:
            raise ValueError(f"cannot parse action {text!r}: expected <stage><kind><microbatch>, e.g. 5F2")
        stage, kind, microbatch = match.groups()
        return cls(int(stage), Kind(kind), int(microbatch) if microbatch else None)

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS


def F(stage: int, microbatch: int) -> Action:  # noqa: N802 - reads like the notation
    return Action(stage, Kind.F, microbatch)


def B(stage: int, microbatch: int) -> Action:  # noqa: N802
    return Action(stage, Kind.B, microbatch)


def I(stage: int, microbatch: int) -> Action:  # noqa: N802, E743
    return Action(stage, Kind.I, microbatch)


def W(stage: int, microbatch: int) -> Action:  # noqa: N802
    return Action(stage, Kind.W, microbatch)


# --- the dependency rule set ------------------------------------------------------------------
# A compute action produces one or two "facts" and requires others, all of its own microbatch.
# Keys are (one of FACT_KINDS, stage, microbatch). In a lowered program a fact made on another
# rank exists here once the SEND that delivers it has run. ``schedules.dataflow`` runs this rule
# set for the validator and the simulator: a new action kind's dependencies go here only.

Fact = tuple[str, int, int]

FACT_KINDS = ("activation", "input_grad", "weight_grad")
"""What a fact says exists; ``schedules.dataflow`` numbers facts in this order."""


def produces(action: Action) -> tuple[Fact, ...]:
    """Facts a compute action makes true once it has run."""
    stage, microbatch = action.stage, action.microbatch
    assert microbatch is not None
    if action.kind is Kind.F:
        return (("activation", stage, microbatch),)
    if action.kind is Kind.B:
        return (("input_grad", stage, microbatch), ("weight_grad", stage, microbatch))
    if action.kind is Kind.I:
        return (("input_grad", stage, microbatch),)
    return (("weight_grad", stage, microbatch),)


def requires(action: Action, placement: Placement) -> tuple[Fact, ...]:
    """Facts that must hold before a compute action may start (the single dependency rule set)."""
    stage, microbatch = action.stage, action.microbatch
    assert microbatch is not None
    if action.kind is Kind.F:
        previous = placement.prev_stage(stage)
        return () if previous is None else (("activation", previous, microbatch),)
    if action.kind in (Kind.B, Kind.I):
        following = placement.next_stage(stage)
        own = ("activation", stage, microbatch)
        return (own,) if following is None else (own, ("input_grad", following, microbatch))
    return (("input_grad", stage, microbatch),)


def delivers(action: Action) -> Fact | None:
    """The fact a SEND hands to its peer's rank (its producer's output); None for other kinds."""
    what = _DELIVERED.get(action.kind)
    if what is None:
        return None
    assert action.microbatch is not None
    return (what, action.stage, action.microbatch)


_DELIVERED = {Kind.SEND_F: "activation", Kind.SEND_B: "input_grad"}


@dataclass(frozen=True)
class Schedule:
    """Every rank's program for one training step.

    ``microbatch_pipeline[m]`` is the pipeline (0 = down, 1 = up) microbatch ``m`` flows through.
    ``programs[rank]`` is that rank's actions in execution order; compute only until ``lower``
    adds SEND/RECV/REDUCE_GRAD. ``options`` records the generator's knobs for display.
    """

    name: str
    placement: Placement
    num_microbatches: int
    microbatch_pipeline: tuple[int, ...]
    programs: tuple[tuple[Action, ...], ...]
    options: tuple[tuple[str, object], ...] = field(default=())

    @property
    def num_ranks(self) -> int:
        return self.placement.num_ranks

    @property
    def is_lowered(self) -> bool:
        return any(not action.is_compute for program in self.programs for action in program)

    def stages_of(self, microbatch: int) -> range:
        """Global stages microbatch ``microbatch`` passes through, in data-flow order."""
        return self.placement.pipeline_stages(self.microbatch_pipeline[microbatch])

    def compute_programs(self) -> tuple[tuple[Action, ...], ...]:
        """Programs with communication and sync actions removed."""
        return tuple(tuple(a for a in program if a.is_compute) for program in self.programs)

    def with_programs(self, programs: tuple[tuple[Action, ...], ...]) -> Schedule:
        return Schedule(
            self.name,
            self.placement,
            self.num_microbatches,
            self.microbatch_pipeline,
            programs,
            self.options,
        )

    def actions(self) -> Iterator[tuple[int, int, Action]]:
        """Every ``(rank, position, action)`` in rank order."""
        for rank, program in enumerate(self.programs):
            for position, action in enumerate(program):
                yield rank, position, action

    def to_csv(self) -> str:
        """One line per rank, rank 0 first, actions comma separated, no header."""
        return "".join(",".join(str(a) for a in program) + "\n" for program in self.programs)


def parse_programs(text: str) -> tuple[tuple[Action, ...], ...]:
    """Parse the CSV form (one line per rank) back into programs; blank cells are skipped."""
    programs = []
    for line in text.strip("\n").splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        programs.append(tuple(Action.parse(cell) for cell in cells if cell))
    return tuple(programs)
