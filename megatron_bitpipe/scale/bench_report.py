"""What ``megatron-bitpipe bench`` reports from its runs: the table, the fitted costs, the
simulator's prediction and error per schedule, each schedule's measured step broken down, the
executor's overhead against megatron-core on the same order, and measured timelines.

Inputs are the runs' ``Measured`` figures and their ``--profile-step`` files
(``FOLDER/run{k}/{schedule}.json``). Medians over runs throughout: a schedule's step is the
median of its runs' median steps, a ratio the median of the per-run ratios, the simulator's
error the median of per-run errors, each predicted from the costs of the schedule's own steps
in that run. ``costs.json`` is the median of one fit per run over its schedules (what
``simulate``, ``sweep`` and ``recommend`` then use).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megatron_bitpipe.scale import measured_costs
from megatron_bitpipe.scale.bench import Measured
from megatron_bitpipe.schedules import registry
from megatron_bitpipe.schedules.choice import MEGATRON_FUNCTIONS

MEGATRON_ORDERS = {name: spec.twin for name, spec in MEGATRON_FUNCTIONS.items() if spec.twin}
"""megatron-core's own schedules and the registry schedule running the same order."""
REFERENCES = tuple(reversed(MEGATRON_ORDERS))
"""The schedules every row is compared with (a vs_ column each), interleaved first."""


@dataclass(frozen=True)
class Report:
    header: list[str]
    rows: list[dict[str, str]]
    costs: measured_costs.MeasuredCosts | None
    breakdown: dict[str, dict[str, float]]
    overhead: list[tuple[str, str, float]]


def profiles_of(folder: str | Path, runs: int, schedule: str) -> list[dict[str, Any]]:
    """Every run's ``--profile-step`` file of ``schedule`` that exists."""
    found = []
    for run in range(runs):
        path = Path(folder) / f"run{run}" / f"{schedule}.json"
        if path.exists():
            found.append({**measured_costs.read_profile(path), "_run": run})
    return found


def build(
    schedules: Sequence[str],
    runs: Sequence[dict[str, Measured]],
    profile_folder: str | Path | None,
    basis: str = "wall",
) -> Report:
    """The bench's figures for ``schedules`` measured in ``runs``."""
    profiles = {name: profiles_of(profile_folder, len(runs), name) if profile_folder else [] for name in schedules}
    traced = [profile for name in schedules for profile in profiles[name] if _has_actions(profile)]
    costs = _fit(traced, basis) if traced else None
    references = [name for name in REFERENCES if name in schedules]
    header = ["schedule", "step_ms_median", "step_ms_min", "step_ms_max", "tokens_per_s", "simulated_ms",
              "error_pct", "peak_activation_bytes", *(f"vs_{name}" for name in references), "runs"]
    rows = []
    for name in schedules:
        medians = [run[name].median_ms for run in runs]
        median = statistics.median(medians)
        samples = [ms for run in runs for ms in run[name].step_ms]
        figures = {
            "schedule": name,
            "step_ms_median": f"{median:.1f}",
            "step_ms_min": f"{min(samples):.1f}",
            "step_ms_max": f"{max(samples):.1f}",
            "tokens_per_s": f"{runs[0][name].tokens_per_step / (median / 1e3):.1f}",
            "peak_activation_bytes": str(max(max(run[name].peak_activation_bytes) for run in runs)),
            "runs": str(len(runs)),
        }
        pairs = _run_predictions(name, runs, profiles, basis)
        predicted = statistics.median(pair[0] for pair in pairs) if pairs else None
        error = statistics.median(100 * (pair[0] - pair[1]) / pair[1] for pair in pairs) if pairs else None
        figures["simulated_ms"] = f"{predicted:.1f}" if predicted else ""
        figures["error_pct"] = f"{error:+.1f}" if error is not None else ""
        for reference in references:
            ratios = [run[reference].median_ms / run[name].median_ms for run in runs]
            figures[f"vs_{reference}"] = f"{statistics.median(ratios):.3f}"
        rows.append(figures)
    breakdown = {
        name: _mean_breakdown(profiles[name], basis)
        for name in schedules
        if any(_has_actions(profile) for profile in profiles[name])
    }
    overhead = [
        (theirs, ours, statistics.median(run[ours].median_ms / run[theirs].median_ms for run in runs))
        for theirs, ours in MEGATRON_ORDERS.items()
        if theirs in schedules and ours in schedules
    ]
    return Report(header, rows, costs, breakdown, overhead)


def _run_predictions(
    name: str, runs: Sequence[dict[str, Measured]], profiles: dict[str, list[dict[str, Any]]], basis: str
) -> list[tuple[float, float]]:
    """Per run: (the simulator's step for ``name`` from the costs measured in that run's steps
    of the same order, the measured median step). A machine's speed drifts between runs and
    between schedules of one run; costs from the schedule's own steps keep that drift out of
    the simulator's error, which then measures what it models (bubbles, messages, syncs, the
    optimizer), and each rank's own speed (``measured_costs.rank_time_factors``) keeps a core
    that ran slower out of it too. megatron-core's schedules take the costs of our run of the
    same order."""
    order = MEGATRON_ORDERS.get(name, name)
    pairs = []
    for index, run in enumerate(runs):
        own = [profile for profile in profiles.get(order, []) if profile["_run"] == index and _has_actions(profile)]
        mine = [profile for profile in profiles.get(name, []) if profile["_run"] == index] or own
        if not own or not mine:
            continue
        costs = measured_costs.fit(own, basis)
        factors = measured_costs.rank_time_factors(own[0], costs, basis)
        predicted = _predict(costs, name, mine, factors, options_from=own[0])
        if predicted:
            pairs.append((predicted, run[name].median_ms))
    return pairs


def _has_actions(profile: dict[str, Any]) -> bool:
    return any(step["actions"] for record in profile["ranks"] for step in record["steps"])


def _fit(profiles: list[dict[str, Any]], basis: str) -> measured_costs.MeasuredCosts:
    """One fit per run (its schedules together), merged by median."""
    by_run: dict[int, list[dict[str, Any]]] = {}
    for profile in profiles:
        by_run.setdefault(profile.get("_run", 0), []).append(profile)
    fits = [measured_costs.fit(group, basis) for group in by_run.values()]
    return measured_costs.merged(fits) if len(fits) > 1 else fits[0]


def _predict(
    costs: measured_costs.MeasuredCosts,
    name: str,
    profiles: list[dict[str, Any]],
    rank_time_factors: tuple[float, ...] = (),
    options_from: dict[str, Any] | None = None,
) -> float | None:
    """The simulated step of ``name`` (a megatron-core schedule: its registry twin's order, with
    the twin's options from ``options_from``, our run of that order)."""
    if not profiles:
        return None
    profile = profiles[0]
    order = MEGATRON_ORDERS.get(name, name)
    if order not in registry.names():
        return None
    source = options_from if options_from is not None and name in MEGATRON_ORDERS else profile
    options = {key: value for key, value in source.get("options", {}).items()
               if key in registry.get(order).options}
    if order == "interleaved-1f1b" and "vp" not in options and profile.get("virtual_size"):
        options["vp"] = profile["virtual_size"]
    return measured_costs.predict_step_ms(
        costs, order, profile["num_ranks"], profile["num_microbatches"],
        measured_costs.parameters_per_rank(profile), options, rank_time_factors,
    )


def _mean_breakdown(profiles: list[dict[str, Any]], basis: str) -> dict[str, float]:
    """Each part's mean over ranks and runs, in ms."""
    rows = [row for profile in profiles for row in measured_costs.breakdown(profile, basis)]
    parts = ("step", *measured_costs.PARTS)
    return {part: statistics.mean(row[part] for row in rows) for part in parts}


def markdown(report: Report, note: str = "") -> str:
    """bench.md: the table, the breakdown, the overhead ratios and the fitted costs."""
    lines = ["| " + " | ".join(report.header) + " |", "|" + "---|" * len(report.header)]
    lines += ["| " + " | ".join(row.get(column, "") for column in report.header) + " |" for row in report.rows]
    if note:
        lines += ["", note]
    if report.breakdown:
        parts = ("step", *measured_costs.PARTS)
        lines += ["", "Measured step by part (ms, mean over ranks and runs; compute is each action's "
                  "span less its wait for messages; not for megatron-core's own schedules, whose actions we do "
                  "not see):", "",
                  "| schedule | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
        for name, figures in report.breakdown.items():
            lines.append(f"| {name} | " + " | ".join(f"{figures[part]:.1f}" for part in parts) + " |")
    for theirs, ours, ratio in report.overhead:
        lines += ["", f"executor overhead: {ours} / {theirs} step time = {ratio:.3f} (same order, median of "
                  f"runs; ours timed every action of its profiled steps, which megatron-core's did not)"]
    if report.costs is not None:
        costs = report.costs
        kinds = ", ".join(
            f"{name} {cost.per_layer_ms:.2f}/layer + {cost.per_action_ms:.2f}/action"
            f" (+{cost.embedding_ms:.2f} embedding, +{cost.head_ms:.2f} head)"
            for name, cost in costs.kinds.items()
        )
        lines += ["", f"fitted costs ({costs.basis} time, ms, written to costs.json): {kinds}; executor "
                  f"{costs.action_overhead_ms:.2f}/action; message {costs.message_latency_ms:.3f} + "
                  f"{costs.message_ms_per_mb:.3f}/MB (in the steps: {_observed(costs)}); gradient all-reduce "
                  f"{costs.sync_ms_per_mb:.2f}/MB; "
                  f"optimizer {costs.optimizer_ms_per_mparam:.2f}/M parameters; other {costs.step_other_ms:.1f} per step"]
    return "\n".join(lines) + "\n"


def _observed(costs: measured_costs.MeasuredCosts) -> str:
    if costs.observed_message_ms is None:
        return "no message waited for"
    return f"{costs.observed_message_ms:.3f} per activation, median"


def write_timelines(profile_folder: str | Path, runs: int, schedules: Sequence[str], out: str | Path) -> list[str]:
    """``OUT/timeline-{schedule}.png`` from the last profiled step of the last run of each
    schedule (needs matplotlib; returns the files written)."""
    from megatron_bitpipe.schedules import render
    from megatron_bitpipe.schedules.ir import Action
    from megatron_bitpipe.schedules.simulate import Event

    written = []
    for name in schedules:
        profiles = profiles_of(profile_folder, runs, name)
        if not profiles or not _has_actions(profiles[-1]):
            continue
        events = [
            Event(index, Action.parse(action[0]), action[1] * 1e3, action[2] * 1e3)
            for index, record in enumerate(profiles[-1]["ranks"])
            for action in record["steps"][-1]["actions"]
            if Action.parse(action[0]).is_compute
        ]
        path = os.path.join(out, f"timeline-{name}.png")
        try:
            render.plot_png(render.measured_result(name, events), path, title=f"{name} (measured), ms")
        except ImportError:
            return written
        written.append(path)
    return written
