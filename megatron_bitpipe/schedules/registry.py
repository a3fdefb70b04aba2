"""Schedule names -> generators, with each generator's constraints checked before it runs.

    build("bitpipe", num_ranks=4, num_microbatches=8)  -> validated compute-only Schedule
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_bitpipe.schedules.errors import ScheduleConfigError
from megatron_bitpipe.schedules.ir import Schedule

Generator = Callable[..., Schedule]
Check = Callable[..., None]


@dataclass(frozen=True)
class ScheduleSpec:
    """A registered schedule: ``generate(num_ranks, num_microbatches, **options)`` after ``check``."""

    name: str
    generate: Generator
    check: Check
    summary: str
    options: tuple[str, ...] = ()
    bidirectional: bool = False
    chunks_per_rank: int = 1
    """Model chunks each rank holds (``vp`` overrides it): sizes the plan before it is built."""


REGISTRY: dict[str, ScheduleSpec] = {}


def register(spec: ScheduleSpec) -> ScheduleSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"schedule {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    _load_generators()
    return list(REGISTRY)


def get(name: str) -> ScheduleSpec:
    _load_generators()
    if name not in REGISTRY:
        known = ", ".join(REGISTRY)
        raise ScheduleConfigError(
            None, "schedule", name, f"is not a known schedule; choose one of: {known}"
        )
    return REGISTRY[name]


def build(name: str, num_ranks: int, num_microbatches: int, **options: object) -> Schedule:
    """Check the settings, generate the schedule and validate it; errors name setting and rule."""
    from megatron_bitpipe.schedules.validate import validate

    spec = get(name)
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        allowed = ", ".join(_named(option) for option in spec.options) or "none"
        raise ScheduleConfigError(
            name,
            None,
            None,
            f"{', '.join(_named(option) for option in unknown)} not accepted; "
            f"this schedule takes: {allowed}",
        )
    if num_ranks < 1:
        raise ScheduleConfigError(name, "pp", num_ranks, "must be >= 1")
    if num_microbatches < 1:
        raise ScheduleConfigError(name, "microbatches", num_microbatches, "must be >= 1")
    spec.check(num_ranks, num_microbatches, **given)
    check_size(spec, num_ranks, num_microbatches, given)
    schedule = spec.generate(num_ranks, num_microbatches, **given)
    validate(schedule)
    return schedule


MAX_ACTIONS = 10_000_000
"""Largest lowered plan built: about 3 GB at the ~260 bytes per action measured while building,
lowering and validating 1f1b at D=64, N=4096 (1.56M actions in 7 s)."""
BYTES_PER_ACTION = 300


def estimated_actions(spec: ScheduleSpec, num_ranks: int, num_microbatches: int, options: dict) -> int:
    """Upper estimate of a lowered plan's actions: F, I and W plus one message each per chunk."""
    chunks = int(options.get("vp") or spec.chunks_per_rank)
    return 6 * num_ranks * num_microbatches * chunks


def check_size(spec: ScheduleSpec, num_ranks: int, num_microbatches: int, options: dict) -> None:
    """Refuse a plan too large to build, with its estimated size, before building it."""
    actions = estimated_actions(spec, num_ranks, num_microbatches, options)
    if actions > MAX_ACTIONS:
        raise ScheduleConfigError(
            spec.name,
            "pp",
            num_ranks,
            f"with {{microbatches}} would be a plan of about {actions:.1e} actions "
            f"(~{actions * BYTES_PER_ACTION / 2**30:.0f} GiB to build); the limit is "
            f"{MAX_ACTIONS:.0e} actions: use fewer ranks or microbatches",
            microbatches=num_microbatches,
        )


GENERATOR_MODULES = (
    "gpipe",
    "one_f_one_b",
    "breadth_first",
    "zero_bubble",
    "vshape",
    "chimera",
    "bitpipe",
    "bitpipe_zb",
)


def _named(option: str) -> str:
    """A generator option named, without a value, in a ScheduleConfigError's rule."""
    return "{" + option + "}"


def _load_generators() -> None:
    """Import the generator modules; each registers itself on import. Missing ones are skipped."""
    import importlib

    for module in GENERATOR_MODULES:
        try:
            importlib.import_module(f"megatron_bitpipe.schedules.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"megatron_bitpipe.schedules.{module}":
                raise
