"""Planner benchmark: generate, validate, lower and re-validate every registered schedule.

    .venv/bin/python scripts/bench_planner.py [--repeat 3] [--limit 1.0] [--clock cpu]
    .venv/bin/python scripts/bench_planner.py --profile bitpipe-official

Cases: D=64, N=1024 and D=8, N=64, with vp=2 for schedules that take --vp; a schedule that
rejects a case is skipped with its reason. Each step is timed with time.perf_counter (or, with
--clock cpu, time.process_time, steadier on a shared machine), best of --repeat runs. Exits 1
if any generate+validate takes longer than --limit seconds (the project's bar: any schedule with
D <= 64, N <= 1024 is generated and validated in well under a second), so the script doubles
as a check. --profile NAME prints where the time goes for NAME at D=64.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_bitpipe.schedules import registry  # noqa: E402
from megatron_bitpipe.schedules.errors import ScheduleConfigError  # noqa: E402
from megatron_bitpipe.schedules.ir import Schedule  # noqa: E402
from megatron_bitpipe.schedules.lower import lower  # noqa: E402
from megatron_bitpipe.schedules.validate import validate  # noqa: E402

CASES = ((64, 1024), (8, 64))
VP = 2


@dataclass(frozen=True)
class Timing:
    """Best-of-N seconds for each step of one (schedule, D, N) case."""

    name: str
    num_ranks: int
    num_microbatches: int
    options: dict[str, object]
    actions: int
    lowered_actions: int
    generate: float
    validate: float
    lower: float
    validate_lowered: float

    @property
    def generate_and_validate(self) -> float:
        return self.generate + self.validate


def options_for(name: str) -> dict[str, object]:
    return {"vp": VP} if "vp" in registry.get(name).options else {}


def generate(
    name: str, num_ranks: int, num_microbatches: int, options: dict[str, object]
) -> Schedule:
    """The registry's check and generator, without build's validation (timed on its own)."""
    spec = registry.get(name)
    spec.check(num_ranks, num_microbatches, **options)
    return spec.generate(num_ranks, num_microbatches, **options)


Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def best_of(repeat: int, clock: Clock, step: Callable[[], object]) -> tuple[float, object]:
    """Smallest time of ``repeat`` calls of ``step`` on ``clock``, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = clock()
        result = step()
        best = min(best, clock() - start)
    return best, result


def time_case(
    name: str, num_ranks: int, num_microbatches: int, repeat: int, clock: Clock
) -> Timing:
    options = options_for(name)
    generate_s, schedule = best_of(
        repeat, clock, lambda: generate(name, num_ranks, num_microbatches, options)
    )
    assert isinstance(schedule, Schedule)
    validate_s, _ = best_of(repeat, clock, lambda: validate(schedule))
    lower_s, lowered = best_of(repeat, clock, lambda: lower(schedule))
    assert isinstance(lowered, Schedule)
    validate_lowered_s, _ = best_of(repeat, clock, lambda: validate(lowered))
    return Timing(
        name=name,
        num_ranks=num_ranks,
        num_microbatches=num_microbatches,
        options=options,
        actions=sum(len(program) for program in schedule.programs),
        lowered_actions=sum(len(program) for program in lowered.programs),
        generate=generate_s,
        validate=validate_s,
        lower=lower_s,
        validate_lowered=validate_lowered_s,
    )


HEADER = (
    f"{'schedule':<18} {'D':>3} {'N':>5} {'opts':<5} {'actions':>8} {'generate':>9} "
    f"{'validate':>9} {'gen+val':>8} {'lower':>8} {'val low':>8} {'lowered':>8}"
)


def row(timing: Timing, limit: float) -> str:
    options = ",".join(f"{key}={value}" for key, value in timing.options.items()) or "-"
    flag = "  OVER LIMIT" if timing.generate_and_validate > limit else ""
    return (
        f"{timing.name:<18} {timing.num_ranks:>3} {timing.num_microbatches:>5} {options:<5} "
        f"{timing.actions:>8} {timing.generate:>9.3f} {timing.validate:>9.3f} "
        f"{timing.generate_and_validate:>8.3f} {timing.lower:>8.3f} "
        f"{timing.validate_lowered:>8.3f} {timing.lowered_actions:>8}{flag}"
    )


def profile(name: str, num_ranks: int, num_microbatches: int) -> None:
    """Print the top functions of each step for ``name``."""
    options = options_for(name)
    schedule = generate(name, num_ranks, num_microbatches, options)
    lowered = lower(schedule)
    steps: dict[str, Callable[[], object]] = {
        "generate": lambda: generate(name, num_ranks, num_microbatches, options),
        "validate": lambda: validate(schedule),
        "lower": lambda: lower(schedule),
        "validate lowered": lambda: validate(lowered),
    }
    for label, step in steps.items():
        profiler = cProfile.Profile()
        profiler.runcall(step)
        print(f"\n=== {label}: {name} D={num_ranks} N={num_microbatches} {options or ''}")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--limit", type=float, default=1.0, help="seconds for generate+validate")
    parser.add_argument("--profile", metavar="NAME", help="profile NAME at D=64, N=1024 instead")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="default wall")
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.profile, *CASES[0])
        return 0
    names = registry.names()
    if not names:
        print("no schedules registered")
        return 1
    print(
        f"{args.clock} seconds, best of {args.repeat}; limit {args.limit:g} s on generate+validate"
    )
    print(HEADER)
    over = []
    for num_ranks, num_microbatches in CASES:
        for name in names:
            try:
                timing = time_case(
                    name, num_ranks, num_microbatches, args.repeat, CLOCKS[args.clock]
                )
            except ScheduleConfigError as error:
                print(f"{name:<18} {num_ranks:>3} {num_microbatches:>5} skipped: {error}")
                continue
            print(row(timing, args.limit), flush=True)
            if timing.generate_and_validate > args.limit:
                over.append(f"{name} D={num_ranks} N={num_microbatches}")
    if over:
        print(f"generate+validate over {args.limit:g} s: {', '.join(over)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
