"""A sweep: every layout of a grid predicted, written to a CSV and plotted.

``expand(sweep)`` lists the grid's points (options a schedule does not take are dropped from its
points, so there are no duplicates); ``predict_all`` simulates each with the cluster's costs,
reporting progress; a point that cannot run (the registry's rules, layers that do not divide) or
does not fit in memory keeps the reason. ``write_csv`` and ``plot`` write the results.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from megatron_bitpipe.scale.config import LaunchConfig, Layout, SweepConfig
from megatron_bitpipe.scale.cost_model import GIB, Prediction, layer_costs, predict
from megatron_bitpipe.schedules import registry

COLUMNS = (
    "schedule", "pipeline_parallel", "tensor_parallel", "data_parallel", "virtual_stages",
    "max_inflight", "pipeline_rank_order", "microbatches", "global_batch_size", "world_size",
    "status", "step_ms", "tokens_per_s", "bubble", "peak_memory_gib", "reason",
    "measured_step_ms", "measured_tokens_per_s", "measured_peak_activation_bytes",
)


@dataclass(frozen=True)
class Point:
    """One layout with its microbatches per step."""

    layout: Layout
    microbatches: int

    def label(self) -> str:
        return f"{self.layout.label()}-n{self.microbatches}"


def expand(sweep: SweepConfig) -> list[Point]:
    """The grid's points, in the config's order, each schedule with only the options it takes
    (and only the world sizes in ``sweep.gpus`` when it lists any)."""
    points: dict[Point, None] = {}
    for schedule, pp, tp, dp, microbatches, vp, inflight, order in itertools.product(
        sweep.schedules, sweep.pipeline_parallel, sweep.tensor_parallel, sweep.data_parallel,
        sweep.microbatches, sweep.virtual_stages, sweep.max_inflight, sweep.pipeline_rank_orders,
    ):
        options = registry.get(schedule).options if schedule in registry.names() else ()
        bidirectional = schedule in registry.names() and registry.get(schedule).bidirectional
        layout = Layout(
            schedule, pp, tp, dp,
            virtual_stages=vp if "vp" in options else None,
            max_inflight=inflight if "max_inflight" in options else None,
            pipeline_rank_order=order if bidirectional else "consecutive",
        )
        if not sweep.gpus or layout.world_size in sweep.gpus:
            points[Point(layout, microbatches)] = None
    return list(points)


def predict_all(sweep: SweepConfig, points: Sequence[Point],
                progress: Callable[[str], None] = print) -> list[Prediction]:
    """Every point predicted; progress reports one line per point."""
    costs = layer_costs(sweep.model, sweep.cluster)
    progress(f"sweep: {len(points)} points of {sweep.model.name} on {sweep.cluster.name} "
             f"(layer costs: {costs.source})")
    predictions = []
    for index, point in enumerate(points, 1):
        model = sweep.model.with_microbatches(point.microbatches, point.layout.data_parallel)
        prediction = predict(model, sweep.cluster, point.layout, point.microbatches, costs=costs)
        predictions.append(prediction)
        progress(f"[{index}/{len(points)}] {point.label()}: {describe(prediction)}")
    return predictions


def describe(prediction: Prediction) -> str:
    """One line: the prediction, or why the point was dropped."""
    if prediction.invalid:
        return f"dropped: {prediction.invalid}"
    memory = f"{prediction.peak_memory_bytes / GIB:.1f} GiB"
    if not prediction.fits:
        return f"dropped: needs {memory} > {prediction.memory_limit_bytes / GIB:.1f} GiB usable"
    return (f"{prediction.step_ms:.1f} ms, {prediction.tokens_per_s:,.0f} tokens/s, "
            f"bubble {100 * prediction.bubble:.1f}%, {memory}")


def status(prediction: Prediction) -> tuple[str, str]:
    if prediction.invalid:
        return "invalid", prediction.invalid
    if not prediction.fits:
        return "out-of-memory", describe(prediction).removeprefix("dropped: ")
    return "ok", ""


def rows(predictions: Iterable[Prediction], measured: dict[Point, dict] | None = None) -> list[dict]:
    """CSV rows (``COLUMNS``); ``measured`` adds a real run's figures by point."""
    result = []
    for prediction in predictions:
        layout, state = prediction.layout, status(prediction)
        found = (measured or {}).get(Point(layout, prediction.microbatches), {})
        valid = prediction.invalid is None
        result.append({
            "schedule": layout.schedule, "pipeline_parallel": layout.pipeline_parallel,
            "tensor_parallel": layout.tensor_parallel, "data_parallel": layout.data_parallel,
            "virtual_stages": layout.virtual_stages or "", "max_inflight": layout.max_inflight or "",
            "pipeline_rank_order": layout.pipeline_rank_order, "microbatches": prediction.microbatches,
            "global_batch_size": prediction.global_batch_size, "world_size": layout.world_size,
            "status": state[0],
            "step_ms": f"{prediction.step_ms:.3f}" if valid else "",
            "tokens_per_s": f"{prediction.tokens_per_s:.1f}" if valid else "",
            "bubble": f"{prediction.bubble:.4f}" if valid else "",
            "peak_memory_gib": f"{prediction.peak_memory_bytes / GIB:.3f}" if valid else "",
            "reason": state[1],
            "measured_step_ms": found.get("step_ms_median", ""),
            "measured_tokens_per_s": found.get("tokens_per_s", ""),
            "measured_peak_activation_bytes": found.get("peak_activation_bytes", ""),
        })
    return result


def write_csv(path: Path, table: list[dict], columns: Sequence[str] = COLUMNS) -> None:
    """``table``'s rows under a header of ``columns``."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)


def plot(out: Path, predictions: Sequence[Prediction], title: str) -> list[Path]:
    """tokens_per_s.png (per PP: tokens/s against microbatches, a line per schedule, its best
    variant) and memory.png (peak memory per schedule against PP); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fitting = [p for p in predictions if p.fits]
    pps = sorted({p.layout.pipeline_parallel for p in fitting}) or [0]
    schedules = list(dict.fromkeys(p.layout.schedule for p in predictions))
    figure, axes = plt.subplots(1, len(pps), figsize=(5 * len(pps), 4), squeeze=False)
    for axis, pp in zip(axes[0], pps):
        for schedule in schedules:
            best: dict[int, float] = {}
            for p in fitting:
                if p.layout.schedule == schedule and p.layout.pipeline_parallel == pp:
                    best[p.microbatches] = max(best.get(p.microbatches, 0.0), p.tokens_per_s)
            if best:
                xs = sorted(best)
                axis.plot(xs, [best[x] for x in xs], marker="o", label=schedule)
        axis.set_title(f"PP={pp}")
        axis.set_xlabel("microbatches per step")
        axis.set_ylabel("tokens/s (simulated, best layout)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    figure.suptitle(f"{title}: tokens/s")
    figure.tight_layout()
    throughput = out / "tokens_per_s.png"
    figure.savefig(throughput, dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7.5, 4))
    valid = [p for p in predictions if p.invalid is None]
    for schedule in schedules:
        peak: dict[int, float] = {}
        for p in valid:
            if p.layout.schedule == schedule:
                pp = p.layout.pipeline_parallel
                peak[pp] = max(peak.get(pp, 0.0), p.peak_memory_bytes / GIB)
        if peak:
            xs = sorted(peak)
            axis.plot(xs, [peak[x] for x in xs], marker="o", label=schedule)
    if valid:
        axis.axhline(valid[0].memory_limit_bytes / GIB, color="grey", linestyle="--", label="usable memory")
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted({p.layout.pipeline_parallel for p in valid}) or [1])
    axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.set_xlabel("pipeline-parallel size")
    axis.set_ylabel("peak memory per GPU, GiB (estimate)")
    axis.set_title(f"{title}: memory")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    memory = out / "memory.png"
    figure.savefig(memory, dpi=110)
    plt.close(figure)
    return [throughput, memory]


def launch_config(sweep: SweepConfig, point: Point) -> LaunchConfig:
    """The launch config of one point: the sweep's ``launch`` settings and the point's layout."""
    settings = dict(sweep.launch)
    settings["extra_args"] = tuple(settings.get("extra_args", ()))
    settings.setdefault("job_name", f"megatron-bitpipe-{sweep.model.name}-{point.label()}")
    model = sweep.model.with_microbatches(point.microbatches, point.layout.data_parallel)
    return LaunchConfig.for_layout(model, sweep.cluster, point.layout, **settings)
