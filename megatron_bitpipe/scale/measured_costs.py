"""Costs fitted to measured steps, the simulator's prediction from them, and where a step went.

``read_profile(path)`` loads a trainer's ``--profile-step`` file. ``fit(profiles)`` turns one or
more of them (several schedules, several runs, every profiled iteration) into ``MeasuredCosts``:

* per kind (F, B, I, W): milliseconds per transformer layer and per action (the fixed work of
  any chunk), plus the embedding's extra on a first stage and the output head and loss's extra
  on a last stage: a least-squares fit over the chunk shapes seen (median per shape first; a
  term no two shapes tell apart is held at 0), each action's cost being its span less the time
  it waited for a message (``basis="wall"``) or its process CPU time (``basis="cpu"``, right at
  any number of ranks per core);
* ``action_overhead_ms``: the executor's time per compute action outside the actions' compute
  (between actions, posting sends and receives, launching syncs);
* messages: latency and bandwidth fitted to the calibration (one-way time against bytes, after
  training). What messages took during the steps (the median, over messages a receiver was
  already waiting for, of the time from the send's posting to the end of that wait; ranks of
  one machine share the clock) is kept as ``observed_message_ms`` for the report: fed to the
  simulator as every message's latency it overstated the schedules with many messages on their
  critical path (v-zb by 12% at hidden 128, where the calibration gives 2%);
* the gradient all-reduce's time per MB from its calibration (the simulator then places each
  replica sync after its stage's last backward); the optimizer step per parameter;
  ``finalize_ms``, the gradient finalization after the program of schedules without replicas
  (the tied embedding's all-reduce between first and last stage, data parallel), and
  ``replica_finalize_ms``, that of two-pipeline schedules (which also waits for the replica
  syncs still running);
  ``step_other_ms``, the rest of an iteration (zeroing, the loss all-reduce).

``predict_step_ms(costs, schedule, ...)`` simulates a schedule with them and adds the optimizer
and the rest. ``breakdown(profile)`` splits one measured step per rank into compute, waiting,
p2p, overhead, gradient-sync wait, optimizer and other. ``save``/``load`` write and read
``costs.json``. Pure except ``read_profile``, ``save`` and ``load``.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from megatron_bitpipe.schedules import registry
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.ir import Action, Schedule
from megatron_bitpipe.schedules.simulate import Costs, SimResult, simulate

COMPUTE = ("F", "B", "I", "W")
MODEL_SIZES = ("hidden_size", "seq_length", "micro_batch_size", "num_attention_heads")
"""The model sizes a profile records and a fit keeps (costs hold only for these)."""
BASES = ("wall", "cpu")


@dataclass(frozen=True)
class KindCost:
    """Milliseconds of one action kind: per layer, per action (whatever the layer count: the
    model's and the callbacks' fixed work), plus extras on first and last stages."""

    per_layer_ms: float
    embedding_ms: float
    head_ms: float
    per_action_ms: float = 0.0

    def chunk_ms(self, layers: float, embedding: bool, head: bool) -> float:
        return (layers * self.per_layer_ms + self.per_action_ms + embedding * self.embedding_ms
                + head * self.head_ms)


@dataclass(frozen=True)
class MeasuredCosts:
    """What ``fit`` found; ``costs.json`` holds exactly these fields."""

    basis: str
    kinds: dict[str, KindCost]
    action_overhead_ms: float
    message_latency_ms: float
    message_ms_per_mb: float
    activation_bytes: int
    sync_ms_per_mb: float
    optimizer_ms_per_mparam: float
    step_other_ms: float
    finalize_ms: float
    num_layers: int
    parameters_per_layer: int
    sources: tuple[str, ...] = field(default=())
    replica_finalize_ms: float | None = None
    """The gradient finalization measured after the program of two-pipeline schedules (their
    replica syncs' wait included); None where only one-pipeline schedules were measured."""
    observed_message_ms: float | None = None
    """What an activation message took in the steps (median, from the send's posting to the end
    of a receiver's wait for it); reported, not simulated (None: no wait observed)."""
    hidden_size: int | None = None
    """The measured model's sizes (None: not recorded); a cluster config's ``measured_costs``
    applies only to a model with the same four (``scale/cost_model.py``)."""
    seq_length: int | None = None
    micro_batch_size: int | None = None
    num_attention_heads: int | None = None

    def kind(self, name: str) -> KindCost:
        """A kind's cost; a missing I or W is half of B (no split schedule was measured)."""
        if name in self.kinds:
            return self.kinds[name]
        backward = self.kinds["B"]
        return KindCost(backward.per_layer_ms / 2, 0.0, backward.head_ms if name == "I" else 0.0,
                        backward.per_action_ms / 2)


def read_profile(path: str | Path) -> dict[str, Any]:
    """A ``--profile-step`` file."""
    return json.loads(Path(path).read_text())


def _compute_ms(action: list[Any], basis: str) -> float:
    _, start, end, waited, cpu = action
    if basis == "cpu" and cpu is not None:
        return cpu * 1e3
    return (end - start - waited) * 1e3


def _chunk_shapes(record: dict[str, Any]) -> dict[int, tuple[int, bool, bool]]:
    return {chunk["stage"]: (chunk["layers"], chunk["embedding"], chunk["head"]) for chunk in record["chunks"]}


def fit(profiles: Sequence[dict[str, Any]], basis: str = "wall") -> MeasuredCosts:
    """``MeasuredCosts`` from ``profiles`` (at least one, of registry schedules)."""
    if basis not in BASES:
        raise ValueError(f"basis {basis!r}: one of {', '.join(BASES)}")
    if not profiles:
        raise ValueError("fit needs at least one --profile-step file")
    if not all(profile.get("ranks") for profile in profiles):
        raise ValueError("a --profile-step file holds no ranks: its run ended before the profiled iteration")
    samples: dict[str, dict[tuple[int, bool, bool], list[float]]] = {kind: {} for kind in COMPUTE}
    overheads, latencies, per_mb, syncs, optimizer, other = [], [], [], [], [], []
    finalize: list[float] = []
    replica_finalize: list[float] = []
    for profile in profiles:
        for record in profile["ranks"]:
            shapes = _chunk_shapes(record)
            latency, slope = _line([(size / 2**20, seconds * 1e3) for size, seconds in record.get("message", [])])
            if latency is not None:
                latencies.append(latency)
                per_mb.append(slope)
            if record.get("sync"):
                size, seconds = record["sync"]
                syncs.append(seconds * 1e3 / (size / 2**20))
            for step in record["steps"]:
                compute_actions, outside = 0, 0.0
                actions = step["actions"]
                for action in actions:
                    parsed = Action.parse(action[0])
                    if parsed.kind.value in COMPUTE:
                        ms = _compute_ms(action, basis)
                        samples[parsed.kind.value].setdefault(shapes[parsed.stage], []).append(ms)
                        compute_actions += 1
                    else:
                        outside += (action[2] - action[1] - action[3]) * 1e3
                if actions and compute_actions:
                    spans = sum(action[2] - action[1] for action in actions)
                    gaps = (actions[-1][2] - actions[0][1] - spans) * 1e3
                    overheads.append((outside + max(gaps, 0.0)) / compute_actions)
        _step_phases(profile, finalize if profile.get("num_pipelines", 1) == 1 else replica_finalize,
                     optimizer, other)
    observed = [latency for profile in profiles for latency in _observed_message_ms(profile)]
    kinds = {kind: _fit_kind(by_shape) for kind, by_shape in samples.items() if by_shape}
    for split in ("I", "W"):
        if split in kinds and "B" in kinds and len({layers for layers, _, _ in samples[split]}) < 2:
            kinds[split] = _as_share_of_backward(kinds["B"], samples, split)
    if "F" not in kinds or "B" not in kinds and "I" not in kinds:
        raise ValueError("the profiles hold no forward or no backward actions")
    if "B" not in kinds:
        kinds["B"] = KindCost(
            kinds["I"].per_layer_ms + kinds["W"].per_layer_ms,
            kinds["I"].embedding_ms + kinds["W"].embedding_ms,
            kinds["I"].head_ms + kinds["W"].head_ms,
            kinds["I"].per_action_ms + kinds["W"].per_action_ms,
        )
    return MeasuredCosts(
        basis=basis,
        kinds=kinds,
        action_overhead_ms=_median(overheads),
        message_latency_ms=_median(latencies),
        message_ms_per_mb=_median(per_mb),
        activation_bytes=int(profiles[0]["activation_bytes"]),
        sync_ms_per_mb=_median(syncs),
        optimizer_ms_per_mparam=_median(optimizer),
        step_other_ms=_median(other),
        finalize_ms=_median(finalize),
        observed_message_ms=statistics.median(observed) if observed else None,
        replica_finalize_ms=_median(replica_finalize) if replica_finalize else None,
        num_layers=int(profiles[0]["num_layers"]),
        parameters_per_layer=_parameters_per_layer(profiles),
        sources=tuple(sorted({profile["schedule"] for profile in profiles})),
        **{size: profiles[0].get(size) for size in MODEL_SIZES},
    )


def _step_phases(profile: dict[str, Any], finalize: list[float], optimizer: list[float], other: list[float]) -> None:
    """Per measured step, the finalization, the optimizer step (per M parameters) and the rest
    of the rank whose program ended last: the others' phases include waiting for it."""
    records = profile["ranks"]
    for index in range(min(len(record["steps"]) for record in records)):
        steps = [(record, record["steps"][index]) for record in records if record["steps"][index]["actions"]]
        if not steps:
            continue
        record, step = max(steps, key=lambda pair: pair[1]["actions"][-1][2])
        actions = step["actions"]
        parameters = sum(chunk["parameters"] for chunk in record["chunks"])
        finalize.append(step["finalize_s"] * 1e3)
        optimizer.append(step["optimizer_s"] * 1e3 / (parameters / 1e6))
        run_span = actions[-1][2] - actions[0][1]
        other.append(max(0.0, (step["step_s"] - run_span - step["finalize_s"] - step["optimizer_s"]) * 1e3))


def _as_share_of_backward(
    backward: KindCost, samples: dict[str, dict[tuple[int, bool, bool], list[float]]], split: str
) -> KindCost:
    """``split`` (I or W) as its measured share of the backward, where its chunks have one layer
    count (per-layer and per-action costs cannot be told apart on their own). As in the
    simulator, the embedding's and head's backward extras go to I whole; the share is of the
    rest."""
    shares = []
    for shape in samples[split]:
        if shape in samples["I"] and shape in samples["W"]:
            _, embedding, head = shape
            extra = embedding * backward.embedding_ms + head * backward.head_ms
            input_grad = statistics.median(samples["I"][shape]) - extra
            weight_grad = statistics.median(samples["W"][shape])
            shares.append(input_grad / (input_grad + weight_grad))
    share = statistics.median(shares) if shares else 0.5
    if split == "W":
        return KindCost(backward.per_layer_ms * (1 - share), 0.0, 0.0, backward.per_action_ms * (1 - share))
    return KindCost(backward.per_layer_ms * share, backward.embedding_ms, backward.head_ms,
                    backward.per_action_ms * share)


_SENDS = {"SEND_F": ("F", 1), "SEND_B": ("B", -1)}


def _observed_message_ms(profile: dict[str, Any]) -> list[float]:
    """Per message whose receiver was waiting for it: ms from the send's posting to the end of
    the wait (the wait opens the consuming action; a backward may be an I), matched within one
    pipeline (``pipeline_group``: its first global rank)."""
    latencies = []
    for index in range(max(len(record["steps"]) for record in profile["ranks"])):
        posted: dict[tuple[int, str, int, int], float] = {}
        consumers: list[tuple[int, str, int, int, float]] = []
        for record in profile["ranks"]:
            if index >= len(record["steps"]):
                continue
            group = record.get("pipeline_group", 0)
            for name, start, end, waited, _ in record["steps"][index]["actions"]:
                action = Action.parse(name)
                kind = action.kind.value
                if kind in _SENDS:
                    consumer, offset = _SENDS[kind]
                    posted[(group, consumer, action.stage + offset, action.microbatch)] = start
                elif waited > 0 and kind in ("F", "B", "I"):
                    kind = "F" if kind == "F" else "B"
                    consumers.append((group, kind, action.stage, action.microbatch, start + waited))
        for group, kind, stage, microbatch, arrived in consumers:
            sent = posted.get((group, kind, stage, microbatch))
            if sent is not None and arrived > sent:
                latencies.append((arrived - sent) * 1e3)
    return latencies


def _parameters_per_layer(profiles: Sequence[dict[str, Any]]) -> int:
    """Parameters of one transformer layer: recorded per chunk, else from a chunk with neither
    embedding nor head, else the difference between two chunks of different layer counts
    holding the same extras."""
    for profile in profiles:
        for record in profile["ranks"]:
            for chunk in record["chunks"]:
                if chunk.get("layer_parameters") and chunk["layers"]:
                    return chunk["layer_parameters"] // chunk["layers"]
    by_shape: dict[tuple[bool, bool], dict[int, int]] = {}
    for profile in profiles:
        for record in profile["ranks"]:
            for chunk in record["chunks"]:
                if chunk["layers"]:
                    extras = (chunk["embedding"], chunk["head"])
                    by_shape.setdefault(extras, {})[chunk["layers"]] = chunk["parameters"]
    plain = by_shape.get((False, False))
    if plain:
        layers, parameters = min(plain.items())
        return parameters // layers
    for counts in by_shape.values():
        if len(counts) > 1:
            (few, small), (many, large) = sorted(counts.items())[:2]
            return (large - small) // (many - few)
    return 0


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _line(points: list[tuple[float, float]]) -> tuple[float | None, float]:
    """Least-squares intercept and slope (intercept None without two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return None, 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return max(0.0, mean_y - slope * mean_x), max(0.0, slope)


def _fit_kind(by_shape: dict[tuple[int, bool, bool], list[float]]) -> KindCost:
    """Least squares of ms = layers * a + embedding * e + head * h + c over the shapes' medians;
    a small ridge holds at 0 any of e, h and c that the measured shapes cannot tell apart, and a
    term that comes out negative is held at 0 and the rest fitted again."""
    rows = [((float(layers), float(embedding), float(head), 1.0), statistics.median(values))
            for (layers, embedding, head), values in by_shape.items()]
    free = [0, 1, 2, 3]
    while True:
        solution = _least_squares(rows, free)
        negative = [index for index in free[1:] if solution[index] < 0]
        if not negative:
            return KindCost(solution[0], solution[1], solution[2], solution[3])
        free.remove(min(negative, key=lambda index: solution[index]))


def _least_squares(rows: list[tuple[tuple[float, ...], float]], free: list[int]) -> list[float]:
    """The ridge-held least squares over the ``free`` columns (the others 0)."""
    normal = [[sum(row[i] * row[j] for row, _ in rows) for j in free] for i in free]
    target = [sum(row[i] * value for row, value in rows) for i in free]
    ridge = 1e-6 * max(normal[0][0], 1.0)
    for position in range(1, len(free)):
        normal[position][position] += ridge
    solution = [0.0] * 4
    for index, value in zip(free, _solve(normal, target), strict=True):
        solution[index] = value
    return solution


def _solve(matrix: list[list[float]], target: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting."""
    size = len(target)
    augmented = [row[:] + [value] for row, value in zip(matrix, target, strict=True)]
    for column in range(size):
        pivot = max(range(column, size), key=lambda row: abs(augmented[row][column]))
        augmented[column], augmented[pivot] = augmented[pivot], augmented[column]
        if abs(augmented[column][column]) < 1e-12:
            continue
        for row in range(size):
            if row != column:
                factor = augmented[row][column] / augmented[column][column]
                augmented[row] = [a - factor * b for a, b in zip(augmented[row], augmented[column], strict=True)]
    return [augmented[i][size] / augmented[i][i] if abs(augmented[i][i]) > 1e-12 else 0.0 for i in range(size)]


def simulator_costs(costs: MeasuredCosts, schedule: Schedule) -> Costs:
    """The simulator's per-stage costs for ``schedule`` (every action pays the overhead)."""
    stages = schedule.placement.stages_per_pipeline
    layers = costs.num_layers / stages
    overhead = costs.action_overhead_ms
    forward, backward = costs.kind("F"), costs.kind("B")
    input_grad, weight_grad = costs.kind("I"), costs.kind("W")
    stage_bytes = int(layers * costs.parameters_per_layer * 4)
    return Costs(
        forward=forward.chunk_ms(layers, False, False) + overhead,
        backward=backward.chunk_ms(layers, False, False) + overhead,
        input_grad=input_grad.chunk_ms(layers, False, False) + overhead,
        weight_grad=weight_grad.chunk_ms(layers, False, False) + overhead,
        stage_extra={0: (forward.embedding_ms, backward.embedding_ms), -1: (forward.head_ms, backward.head_ms)},
        latency=costs.message_latency_ms,
        bandwidth=(2**20 / costs.message_ms_per_mb) if costs.message_ms_per_mb > 0 else float("inf"),
        message_bytes=costs.activation_bytes,
        # a sync of one stage costs 2 * stage_grad_bytes / sync_bandwidth: the calibrated ms per MB
        sync_bandwidth=(2 * 2**20 / costs.sync_ms_per_mb) if costs.sync_ms_per_mb > 0 else float("inf"),
        stage_grad_bytes=stage_bytes,
    )


def predict_step_ms(
    costs: MeasuredCosts,
    name: str,
    num_ranks: int,
    num_microbatches: int,
    parameters_per_rank: float,
    options: dict[str, Any] | None = None,
    rank_time_factors: tuple[float, ...] = (),
) -> float:
    """Simulated step of registry schedule ``name``: its makespan with ``costs`` (replica syncs
    included; each pipeline rank's compute times ``rank_time_factors``, see
    ``rank_time_factors``), plus gradient finalization (``finalize_ms``), the optimizer step for
    ``parameters_per_rank`` and the step's other work."""
    schedule = registry.build(name, num_ranks, num_microbatches, **(options or {}))
    stage_costs = replace(simulator_costs(costs, schedule), rank_time_factors=rank_time_factors)
    result = simulate(lower(schedule), stage_costs)
    optimizer = costs.optimizer_ms_per_mparam * parameters_per_rank / 1e6
    finalize = finalize_ms(costs, schedule.placement.num_pipelines, result)
    return result.makespan + finalize + optimizer + costs.step_other_ms


def finalize_ms(costs: MeasuredCosts, num_pipelines: int, result: SimResult) -> float:
    """What finalization adds after ``result`` (the simulated lowered step): the measured one,
    less (for two pipelines) the replica syncs the simulation ran past the last compute action."""
    if num_pipelines == 1 or costs.replica_finalize_ms is None:
        return costs.finalize_ms
    sync_tail = result.makespan - max((event.end for event in result.events), default=0.0)
    return max(costs.replica_finalize_ms - sync_tail, 0.0)


def rank_time_factors(profile: dict[str, Any], costs: MeasuredCosts, basis: str = "wall") -> tuple[float, ...]:
    """Per pipeline rank of ``profile``, the median over its compute actions (on every tensor-
    and data-parallel rank of it) of measured over fitted time: how much slower (> 1) or faster
    its cores ran than the fit's pooled costs. On a shared machine two cores may differ by tens
    of percent for a while."""
    ratios: dict[int, list[float]] = {}
    for record in profile["ranks"]:
        shapes = _chunk_shapes(record)
        mine = ratios.setdefault(record.get("pipeline_rank", record["rank"]), [])
        for step in record["steps"]:
            for action in step["actions"]:
                parsed = Action.parse(action[0])
                if parsed.kind.value in COMPUTE:
                    modelled = costs.kind(parsed.kind.value).chunk_ms(*shapes[parsed.stage])
                    if modelled > 0:
                        mine.append(_compute_ms(action, basis) / modelled)
    return tuple(statistics.median(ratios[rank]) if ratios[rank] else 1.0 for rank in sorted(ratios))


def parameters_per_rank(profile: dict[str, Any]) -> float:
    """The most parameters any rank of the profiled run held."""
    return max(sum(chunk["parameters"] for chunk in record["chunks"]) for record in profile["ranks"])


PARTS = ("compute", "waiting", "p2p", "overhead", "sync wait", "optimizer", "other")


def breakdown(profile: dict[str, Any], basis: str = "wall") -> list[dict[str, float]]:
    """Per rank and measured step, the step in milliseconds by ``PARTS`` (they add up to it)."""
    rows = []
    for record in profile["ranks"]:
        for step in record["steps"]:
            actions = step["actions"]
            compute = waiting = p2p = 0.0
            for action in actions:
                kind = Action.parse(action[0]).kind
                span, waited = (action[2] - action[1]) * 1e3, action[3] * 1e3
                if kind.value in COMPUTE:
                    compute += min(_compute_ms(action, basis), span - waited)
                    waiting += waited
                else:
                    p2p += span
            run_span = (actions[-1][2] - actions[0][1]) * 1e3 if actions else 0.0
            total = step["step_s"] * 1e3
            finalize, optimizer = step["finalize_s"] * 1e3, step["optimizer_s"] * 1e3
            rows.append({
                "rank": record["rank"],
                "iteration": step.get("iteration", 0),
                "step": total,
                "compute": compute,
                "waiting": waiting,
                "p2p": p2p,
                "overhead": run_span - compute - waiting - p2p,
                "sync wait": finalize,
                "optimizer": optimizer,
                "other": total - run_span - finalize - optimizer,
            })
    return rows


def measured_step_ms(profile: dict[str, Any]) -> float:
    """The median over the profiled iterations of the slowest rank's step."""
    by_iteration: dict[int, float] = {}
    if not any(record["steps"] for record in profile["ranks"]):
        raise ValueError(f"{profile.get('schedule')}: the --profile-step file holds no measured step")
    for record in profile["ranks"]:
        for index, step in enumerate(record["steps"]):
            key = step.get("iteration", index)
            by_iteration[key] = max(by_iteration.get(key, 0.0), step["step_s"] * 1e3)
    return statistics.median(by_iteration.values())


def save(costs: MeasuredCosts, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(costs), indent=2) + "\n")


def load(path: str | Path) -> MeasuredCosts:
    """A ``costs.json`` written by ``save`` (``megatron-bitpipe bench``); ValueError in one line
    for a file that is not one (or comes from an older version: rerun the bench)."""
    try:
        data = json.loads(Path(path).read_text())
        kinds = {name: KindCost(**value) for name, value in data.pop("kinds").items()}
        data["sources"] = tuple(data.get("sources", ()))
        return MeasuredCosts(kinds=kinds, **data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a costs.json of this version of megatron-bitpipe bench "
                         f"({str(error).splitlines()[0]}); rerun the bench to make one") from None


def merged(values: Iterable[MeasuredCosts]) -> MeasuredCosts:
    """Field-wise median of several fits (one per repeated run)."""
    fits = list(values)
    if not fits:
        raise ValueError("merged needs at least one fit")
    first = fits[0]
    kinds = {
        name: KindCost(*(statistics.median(getattr(fit.kind(name), part) for fit in fits)
                         for part in ("per_layer_ms", "embedding_ms", "head_ms", "per_action_ms")))
        for name in first.kinds
    }
    numbers = {
        name: statistics.median(getattr(fit, name) for fit in fits)
        for name in ("action_overhead_ms", "message_latency_ms", "message_ms_per_mb", "sync_ms_per_mb",
                     "optimizer_ms_per_mparam", "step_other_ms", "finalize_ms")
    }
    sources = tuple(sorted({source for fit in fits for source in fit.sources}))
    replica = [fit.replica_finalize_ms for fit in fits if fit.replica_finalize_ms is not None]
    observed = [fit.observed_message_ms for fit in fits if fit.observed_message_ms is not None]
    return MeasuredCosts(basis=first.basis, kinds=kinds, activation_bytes=first.activation_bytes,
                         num_layers=first.num_layers, parameters_per_layer=first.parameters_per_layer,
                         sources=sources, replica_finalize_ms=statistics.median(replica) if replica else None,
                         observed_message_ms=statistics.median(observed) if observed else None,
                         **numbers, **{size: getattr(first, size) for size in MODEL_SIZES})


