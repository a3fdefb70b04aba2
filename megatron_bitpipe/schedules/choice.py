"""One schedule choice: a name (registry schedule or megatron-core's own function) and its options.

    (choice,) = parse("bitpipe")
    choice.build(4, 8)          # the validated Schedule, built once per (ranks, microbatches)

Front ends parse their strings here once; everything after holds the value, not the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_bitpipe.schedules.ir import Schedule
from megatron_bitpipe.schedules.placement import Placement, looped
from megatron_bitpipe.schedules.registry import build, get, names


@dataclass(frozen=True)
class MegatronFunction:
    """A schedule megatron-core runs with its own function; the mcore layer maps ``function``."""

    name: str
    function: str
    """``megatron.core.pipeline_parallel.schedules`` function the mcore layer calls."""
    twin: str | None
    """The registry schedule running the same order (simulation), or None."""
    takes_virtual_size: bool = False
    checked_by_twin: bool = False
    """Whether a run's settings are checked by building the twin (megatron's own checks)."""


MEGATRON_FUNCTIONS: dict[str, MegatronFunction] = {
    spec.name: spec
    for spec in (
        MegatronFunction(
            "megatron-1f1b", "forward_backward_pipelining_without_interleaving", "1f1b"
        ),
        MegatronFunction(
            "megatron-interleaved",
            "forward_backward_pipelining_with_interleaving",
            "interleaved-1f1b",
            takes_virtual_size=True,
            checked_by_twin=True,
        ),
        MegatronFunction("none", "forward_backward_no_pipelining", None),
    )
}
"""megatron-core's own schedules, by the name a run gives; ``none`` is the unpipelined reference."""
REFERENCE = "none"


@dataclass(frozen=True)
class ScheduleChoice:
    """The schedule a run uses: a name and its options (sorted (option, value) pairs)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    _built: dict[tuple[int, int], Schedule | None] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @property
    def megatron(self) -> MegatronFunction | None:
        """megatron-core's function this choice runs, or None for a registry schedule."""
        return MEGATRON_FUNCTIONS.get(self.name)

    @property
    def is_megatron(self) -> bool:
        """Runs one of megatron-core's own functions (``none`` included), not our executor."""
        return self.name in MEGATRON_FUNCTIONS

    @property
    def is_reference(self) -> bool:
        """The unpipelined reference (``none``: pipeline size 1)."""
        return self.name == REFERENCE

    @property
    def uses_registry(self) -> bool:
        """Runs a registry schedule on the runtime executor."""
        return not self.is_megatron

    @property
    def takes_virtual_size(self) -> bool:
        """Accepts a virtual pipeline size (``vp``)."""
        megatron = self.megatron
        if megatron is not None:
            return megatron.takes_virtual_size
        return self.name in names() and "vp" in get(self.name).options

    @property
    def twin(self) -> str | None:
        """The registry schedule running this choice's order: itself, or megatron's twin."""
        megatron = self.megatron
        return self.name if megatron is None else megatron.twin

    def option(self, key: str) -> Any:
        """One option's value, or None."""
        return dict(self.options).get(key)

    def with_options(self, **options: Any) -> ScheduleChoice:
        """This choice with ``options`` (None values dropped) replacing its own."""
        given = {key: value for key, value in options.items() if value is not None}
        return ScheduleChoice(self.name, tuple(sorted(given.items())))

    def placement(self, num_ranks: int, num_microbatches: int = 1) -> Placement:
        """Where the chunks sit on ``num_ranks`` pipeline ranks (a registry schedule is built)."""
        if self.is_reference:
            return looped(1, 1)
        if self.is_megatron:
            return looped(num_ranks, int(self.option("vp") or 1))
        return self.build(num_ranks, num_microbatches).placement

    def build(self, num_ranks: int, num_microbatches: int) -> Schedule | None:
        """The validated Schedule (the twin's for megatron's checked functions, else None);
        built once per (num_ranks, num_microbatches). Raises ScheduleConfigError."""
        key = (num_ranks, num_microbatches)
        if key not in self._built:
            self._built[key] = self._build(num_ranks, num_microbatches)
        return self._built[key]

    def _build(self, num_ranks: int, num_microbatches: int) -> Schedule | None:
        megatron = self.megatron
        if megatron is None:
            return build(self.name, num_ranks, num_microbatches, **dict(self.options))
        if megatron.checked_by_twin and megatron.twin is not None:
            return build(megatron.twin, num_ranks, num_microbatches, **dict(self.options))
        return None

    def __str__(self) -> str:
        return self.name


def known_names() -> list[str]:
    """Every name a choice may take: the registry's, then megatron-core's functions."""
    return names() + list(MEGATRON_FUNCTIONS)


def parse(text: str) -> tuple[ScheduleChoice, ...]:
    """The choices of a comma-separated list of names (blanks dropped), without options."""
    return tuple(ScheduleChoice(name.strip()) for name in text.split(",") if name.strip())
