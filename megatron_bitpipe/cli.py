"""The ``megatron-bitpipe`` command line: plan, simulate and render schedules.

    megatron-bitpipe plan --schedule bitpipe --pp 4 --microbatches 8 --format csv
    megatron-bitpipe simulate --schedule all --pp 8 --microbatches 32 --vp 2
    megatron-bitpipe render --schedule bitpipe --pp 4 --microbatches 8 --out bitpipe.png
    megatron-bitpipe recommend --model configs/models/paper-gpt.yaml \
        --cluster configs/clusters/h100-8gpu-nodes.yaml --gpus 32
    megatron-bitpipe sweep configs/sweeps/paper-gpt-32gpus.yaml
    megatron-bitpipe launch configs/launch/paper-gpt-bitpipe-32gpus.yaml --slurm

Each subcommand is a ``Command`` in ``COMMANDS``: a function that adds its arguments and one that
runs it and returns the exit status; ``launch``, ``sweep``, ``recommend`` and ``bench`` come from
``megatron_bitpipe.scale.commands``.
Bad settings print ``megatron-bitpipe: error: <message>`` to stderr and exit 2, as argparse
does for its own errors; nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

from megatron_bitpipe.outputs import prepare_output
from megatron_bitpipe.scale import measured_costs
from megatron_bitpipe.scale.commands import COMMAND_SPECS
from megatron_bitpipe.schedules import registry
from megatron_bitpipe.schedules.choice import parse as choice_list
from megatron_bitpipe.schedules.errors import ScheduleConfigError, ScheduleError
from megatron_bitpipe.schedules.ir import Schedule
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.render import (
    plot_png,
    program_grid,
    text_grid,
    to_csv,
    write_chrome_trace,
)
from megatron_bitpipe.schedules.simulate import Costs, ModelDims, SimResult, simulate
from megatron_bitpipe.schedules.validate import validate

PROG = "megatron-bitpipe"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
BASELINE = "1f1b"
ALL = "all"
GIB = 2**30

SCHEDULE_OPTIONS = {
    "vp": "--vp",
    "microbatch_group_size": "--microbatch-group-size",
    "max_inflight": "--max-inflight",
    "max_stash": "--max-stash",
}
"""Generator options (registry names) and the flag that sets each."""


@dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares it; ``run(args)`` returns its exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    passes_unknown: bool = False
    """Unknown arguments go to ``args.passthrough`` (bench hands them to the trainer)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not args.command.passes_unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.passthrough = unknown
    try:
        return args.command.run(args)
    except ValueError as error:  # ScheduleConfigError and ScheduleError are ValueErrors
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as the docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except OSError as error:  # an output that cannot be written: the path and the reason
        print(f"{PROG}: error: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of ``COMMANDS``."""
    parser = _Parser(
        prog=PROG,
        description="Pipeline-parallel schedules (BitPipe, V-shape, ...) for megatron-core.",
    )
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    for command in COMMANDS:
        subparser = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(subparser)
        subparser.set_defaults(command=command)
    return parser


# --- argument groups shared by the subcommands ---------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def add_schedule_arguments(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """--schedule, --pp, --microbatches and the generator options."""
    names = ", ".join(registry.names())
    if several:
        what = f"NAME[,NAME...] or '{ALL}'; one of: {names}"
        parser.add_argument("--schedule", required=True, metavar="NAME[,NAME...]|all", help=what)
    else:
        parser.add_argument("--schedule", required=True, metavar="NAME", help=f"one of: {names}")
    parser.add_argument("--pp", type=int, required=True, metavar="D", help="pipeline ranks")
    parser.add_argument("--microbatches", type=int, required=True, metavar="N", help="per step")
    parser.add_argument(
        "--vp", type=int, metavar="V", help="model chunks per rank (looped schedules)"
    )
    parser.add_argument(
        "--microbatch-group-size", type=int, metavar="G", help="interleaved-1f1b group"
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        metavar="K",
        help="bitpipe: microbatches in flight per direction",
    )
    parser.add_argument(
        "--max-stash",
        type=int,
        metavar="A",
        help="bitpipe, bitpipe-zb: chunk activations stashed per rank, D..3D (default 2D)",
    )


def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    """Action durations, the message model and, optionally, model sizes for bytes."""
    costs = parser.add_argument_group(
        "costs: F/B/I/W of one microbatch over 1/D of the model (scaled to each schedule's stage "
        "size), any time unit; bandwidths in bytes per time unit"
    )
    costs.add_argument("--cost-f", type=positive_float, default=1.0, help="forward (default 1)")
    costs.add_argument(
        "--cost-b", type=positive_float, default=2.0, help="full backward (default 2)"
    )
    costs.add_argument("--cost-i", type=positive_float, help="input-gradient half (default B/2)")
    costs.add_argument("--cost-w", type=positive_float, help="weight-gradient half (default B/2)")
    costs.add_argument("--latency", type=non_negative_float, default=0.0, help="per p2p message")
    costs.add_argument("--bandwidth", type=positive_float, default=math.inf, help="p2p")
    costs.add_argument(
        "--sync-latency", type=non_negative_float, default=0.0, help="replica grad sync"
    )
    costs.add_argument(
        "--sync-bandwidth", type=positive_float, default=math.inf, help="replica grad sync"
    )
    dims = parser.add_argument_group("model sizes (all four, for bytes and GiB)")
    dims.add_argument("--num-layers", type=positive_int)
    dims.add_argument("--hidden-size", type=positive_int)
    dims.add_argument("--num-attention-heads", type=positive_int)
    dims.add_argument("--seq-length", type=positive_int)
    dims.add_argument("--micro-batch-size", type=positive_int, default=1)


def given_options(args: argparse.Namespace) -> dict[str, object]:
    """Generator options set on the command line (None-valued ones left out)."""
    return {
        name: getattr(args, name) for name in SCHEDULE_OPTIONS if getattr(args, name) is not None
    }


def accepted_options(name: str, options: dict[str, object]) -> dict[str, object]:
    """The subset of ``options`` schedule ``name`` takes."""
    accepted = registry.get(name).options
    return {key: value for key, value in options.items() if key in accepted}


def costs_from(args: argparse.Namespace) -> Costs:
    return Costs(
        forward=args.cost_f,
        backward=args.cost_b,
        input_grad=args.cost_i,
        weight_grad=args.cost_w,
        latency=args.latency,
        bandwidth=args.bandwidth,
        sync_latency=args.sync_latency,
        sync_bandwidth=args.sync_bandwidth,
    )


DIM_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "seq_length": "--seq-length",
}


def dims_from(args: argparse.Namespace) -> ModelDims | None:
    """ModelDims if model sizes are given; ValueError naming the missing flags if only some are."""
    missing = [flag for name, flag in DIM_FLAGS.items() if getattr(args, name) is None]
    if len(missing) == len(DIM_FLAGS):
        return None
    if missing:
        raise ValueError(f"{', '.join(missing)} missing: model sizes are given all four or none")
    return ModelDims(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
    )


def build_schedule(name: str, args: argparse.Namespace, options: dict[str, object]) -> Schedule:
    """The validated compute-only schedule ``name`` at ``--pp``/``--microbatches``."""
    return registry.build(name, args.pp, args.microbatches, **options)


def simulate_schedule(schedule: Schedule, costs: Costs, dims: ModelDims | None) -> SimResult:
    """Simulate the executable form (lowered, so replica syncs count) at per-stage costs."""
    return simulate(lower(schedule), stage_costs(schedule, costs), dims)


def stage_share(schedule: Schedule) -> float:
    """D / S: how much of one rank's 1/D share of the model one stage of ``schedule`` holds."""
    return schedule.num_ranks / schedule.placement.stages_per_pipeline


def stage_costs(schedule: Schedule, rank_costs: Costs) -> Costs:
    """Per-stage costs from costs given for one rank's share of the model (1/D of the layers).

    A schedule with S stages per pipeline cuts the model into S pieces, so each stage action
    takes D/S of the given time: interleaved 1F1B with vp=2 and BitPipe (S=2D) run half-size
    stages. This is what makes makespans of different schedules comparable at equal devices.
    """
    scale = stage_share(schedule)
    return replace(
        rank_costs,
        forward=rank_costs.forward * scale,
        backward=rank_costs.backward * scale,
        input_grad=None if rank_costs.input_grad is None else rank_costs.input_grad * scale,
        weight_grad=None if rank_costs.weight_grad is None else rank_costs.weight_grad * scale,
    )


# --- plan ----------------------------------------------------------------------------------------


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    add_schedule_arguments(parser)
    parser.add_argument("--lowered", action="store_true", help="with SEND/RECV/REDUCE_GRAD actions")
    parser.add_argument(
        "--format", choices=tuple(PLAN_FORMATS), default="text", help="text grid, CSV or JSON"
    )


def run_plan(args: argparse.Namespace) -> int:
    schedule = build_schedule(args.schedule, args, given_options(args))
    if args.lowered:
        schedule = lower(schedule)
        validate(schedule)
    sys.stdout.write(PLAN_FORMATS[args.format](schedule))
    return EXIT_OK


def plan_json(schedule: Schedule) -> str:
    """Metadata plus each rank's action strings, in execution order."""
    placement = schedule.placement
    document = {
        "schedule": schedule.name,
        "num_ranks": schedule.num_ranks,
        "num_microbatches": schedule.num_microbatches,
        "options": dict(schedule.options),
        "placement": {
            "kind": placement.kind,
            "num_pipelines": placement.num_pipelines,
            "stages_per_pipeline": placement.stages_per_pipeline,
            "rank_stages": placement.rank_stages,
        },
        "microbatch_pipeline": list(schedule.microbatch_pipeline),
        "lowered": schedule.is_lowered,
        "programs": [[str(action) for action in program] for program in schedule.programs],
    }
    return json_document(document)


def json_document(document: dict[str, object]) -> str:
    """JSON with one top-level key per line and, for lists of lists, one inner list per line."""
    lines = []
    for key, value in document.items():
        if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
            inner = ",\n".join(f"  {json.dumps(item)}" for item in value)
            lines.append(f" {json.dumps(key)}: [\n{inner}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, default=str)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


PLAN_FORMATS: dict[str, Callable[[Schedule], str]] = {
    "text": program_grid,
    "csv": to_csv,
    "json": plan_json,
}


# --- simulate ------------------------------------------------------------------------------------


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    add_schedule_arguments(parser, several=True)
    add_cost_arguments(parser)
    parser.add_argument(
        "--measured-costs",
        metavar="COSTS.json",
        help="costs measured by `megatron-bitpipe bench` (its costs.json) instead of the --cost-* "
        "flags: per-layer and per-action compute, messages and replica syncs of the measured model",
    )
    parser.add_argument("--grid", action="store_true", help="also print each schedule's time grid")


@dataclass(frozen=True)
class Row:
    """One schedule's line of the comparison table: its result, or why it has none."""

    name: str
    result: SimResult | None = None
    rejected: str = ""
    chunk_scale: float = 1.0
    """``stage_share`` of the schedule: turns stashed chunks into 1/D-of-the-model units."""


def simulated_row(
    name: str, schedule: Schedule, costs: Costs, dims: ModelDims | None, measured: Any = None
) -> Row:
    """The schedule simulated at ``costs`` (per 1/D of the model), or at ``measured`` costs."""
    if measured is None:
        result = simulate_schedule(schedule, costs, dims)
    else:
        result = simulate(lower(schedule), measured_costs.simulator_costs(measured, schedule), dims)
    return Row(name, result, chunk_scale=stage_share(schedule))


def run_simulate(args: argparse.Namespace) -> int:
    names = schedule_names(args.schedule)
    costs, dims = costs_from(args), dims_from(args)
    measured = measured_costs.load(args.measured_costs) if args.measured_costs else None
    options = given_options(args)
    single = len(names) == 1
    rows = []
    for name in names:
        try:
            picked = options if single else accepted_options(name, options)
            rows.append(simulated_row(name, build_schedule(name, args, picked), costs, dims, measured))
        except ValueError as error:
            if single:
                raise
            why = "invalid schedule" if isinstance(error, ScheduleError) else "rejected"
            rows.append(Row(name, rejected=f"{why}: {str(error).splitlines()[0]}"))
    baseline = baseline_row(rows, args, costs, dims, options, measured)
    line = settings_line(args, costs, options)
    if measured is not None:
        line = f"simulated at pp {args.pp}, microbatches {args.microbatches}, costs measured in {args.measured_costs} (ms)"
    print(line)
    print(comparison_table(rows, baseline, with_bytes=dims is not None))
    print(
        f"peak act: stashed activations per rank, in microbatches over 1/{args.pp} of the model "
        f"(1f1b's rank 0 holds min(pp, microbatches))"
    )
    if baseline.result is None:
        print(f"speed-up: {BASELINE} {baseline.rejected or 'is not registered'}")
    if args.grid:
        for row in rows:
            if row.result is not None:
                print(f"\n{row.name}")
                print(text_grid(row.result), end="")
    return EXIT_OK


def schedule_names(text: str) -> list[str]:
    """``all`` or a comma-separated list; unknown names raise ScheduleConfigError."""
    if text.strip() == ALL:
        return registry.names()
    names = [choice.name for choice in choice_list(text)]
    if not names:
        raise ScheduleConfigError(None, "schedule", text, "names no schedule")
    for name in names:
        registry.get(name)
    return names


def baseline_row(
    rows: list[Row],
    args: argparse.Namespace,
    costs: Costs,
    dims: ModelDims | None,
    options: dict[str, object],
    measured: measured_costs.MeasuredCosts | None = None,
) -> Row:
    """1F1B at the same settings (only the options it takes), reusing its row when present."""
    for row in rows:
        if row.name == BASELINE:
            return row
    if BASELINE not in registry.names():
        return Row(BASELINE)
    try:
        schedule = build_schedule(BASELINE, args, accepted_options(BASELINE, options))
        return simulated_row(BASELINE, schedule, costs, dims, measured)
    except ValueError as error:
        return Row(BASELINE, rejected=f"rejects these settings: {str(error).splitlines()[0]}")


def settings_line(args: argparse.Namespace, costs: Costs, options: dict[str, object]) -> str:
    parts = [f"pp {args.pp}", f"microbatches {args.microbatches}"]
    parts += [f"{SCHEDULE_OPTIONS[key].lstrip('-')} {value}" for key, value in options.items()]
    durations = [f"F {costs.forward:g}", f"B {costs.backward:g}"]
    durations += [] if costs.input_grad is None else [f"I {costs.input_grad:g}"]
    durations += [] if costs.weight_grad is None else [f"W {costs.weight_grad:g}"]
    parts.append(", ".join(durations) + f" per 1/{args.pp} of the model")
    if costs.latency or costs.bandwidth != math.inf:
        parts.append(f"latency {costs.latency:g}, bandwidth {costs.bandwidth:g}")
    if costs.sync_latency or costs.sync_bandwidth != math.inf:
        parts.append(f"sync latency {costs.sync_latency:g}, bandwidth {costs.sync_bandwidth:g}")
    return "simulated at " + ", ".join(parts)


def comparison_table(rows: list[Row], baseline: Row, *, with_bytes: bool) -> str:
    """One aligned table, a row per schedule; rejected schedules say why instead of numbers."""
    header = ["schedule", "makespan", "bubble", "peak chunks", "peak act"]
    header += ["peak GiB"] if with_bytes else []
    header += ["p2p msgs"]
    header += ["p2p GiB"] if with_bytes else []
    header += [f"vs {BASELINE}"]
    reference = baseline.result.makespan if baseline.result is not None else None
    body = [
        table_cells(row.result, row.chunk_scale, reference, with_bytes)
        if row.result is not None
        else None
        for row in rows
    ]
    name_width = max(len(header[0]), *(len(row.name) for row in rows))
    widths = [name_width] + [
        max(len(title), *(len(cells[i]) for cells in body if cells is not None))
        for i, title in enumerate(header[1:])
    ]
    lines = [
        "  ".join(
            f"{title:<{w}}" if i == 0 else f"{title:>{w}}"
            for i, (title, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * width for width in widths))
    for row, cells in zip(rows, body, strict=True):
        if cells is None:
            lines.append(f"{row.name:<{name_width}}  {row.rejected}")
        else:
            values = "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths[1:], strict=True))
            lines.append(f"{row.name:<{name_width}}  {values}")
    return "\n".join(lines)


def table_cells(
    result: SimResult, scale: float, reference: float | None, with_bytes: bool
) -> list[str]:
    """``scale`` turns stashed chunk activations into 1/D-of-the-model units (D/S)."""
    chunks = max(result.peak_activations)
    cells = [
        f"{result.makespan:g}",
        f"{result.bubble_ratio:.1%}",
        str(chunks),
        f"{chunks * scale:g}",
    ]
    if with_bytes:
        assert result.peak_activation_bytes is not None
        cells.append(f"{max(result.peak_activation_bytes) / GIB:.2f}")
    cells.append(str(result.p2p_messages))
    if with_bytes:
        cells.append(f"{result.p2p_bytes / GIB:.2f}")
    cells.append("-" if reference is None else f"{reference / result.makespan:.2f}x")
    return cells


# --- render --------------------------------------------------------------------------------------


def add_render_arguments(parser: argparse.ArgumentParser) -> None:
    add_schedule_arguments(parser)
    add_cost_arguments(parser)
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="FILE.png, FILE.json (Perfetto), FILE.csv or FILE.txt",
    )


def run_render(args: argparse.Namespace) -> int:
    out = Path(args.out)
    writer = RENDERERS.get(out.suffix.lower())
    if writer is None:
        raise ValueError(f"--out {args.out}: the name must end in {', '.join(RENDERERS)}")
    prepare_output(out, "--out")
    schedule = build_schedule(args.schedule, args, given_options(args))
    try:
        writer(schedule, args, out)
    except ImportError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {out}")
    return EXIT_OK


def render_png(schedule: Schedule, args: argparse.Namespace, out: Path) -> None:
    result = simulate_schedule(schedule, costs_from(args), dims_from(args))
    plot_png(result, out, placement=schedule.placement)


def render_trace(schedule: Schedule, args: argparse.Namespace, out: Path) -> None:
    result = simulate_schedule(schedule, costs_from(args), dims_from(args))
    write_chrome_trace(
        out, result.events, result.sync_events, name=schedule.name, placement=schedule.placement
    )


def render_csv(schedule: Schedule, args: argparse.Namespace, out: Path) -> None:
    out.write_text(to_csv(schedule))


def render_text(schedule: Schedule, args: argparse.Namespace, out: Path) -> None:
    out.write_text(text_grid(simulate_schedule(schedule, costs_from(args), dims_from(args))))


RENDERERS: dict[str, Callable[[Schedule, argparse.Namespace, Path], None]] = {
    ".png": render_png,
    ".json": render_trace,
    ".csv": render_csv,
    ".txt": render_text,
}


COMMANDS: tuple[Command, ...] = (
    Command("plan", "print a schedule's per-rank programs", add_plan_arguments, run_plan),
    Command(
        "simulate",
        "compare schedules' simulated step time, bubble and memory",
        add_simulate_arguments,
        run_simulate,
    ),
    Command(
        "render",
        "draw a schedule to PNG, Chrome trace JSON, CSV or a text grid",
        add_render_arguments,
        run_render,
    ),
    *(Command(*spec) for spec in COMMAND_SPECS),
)
