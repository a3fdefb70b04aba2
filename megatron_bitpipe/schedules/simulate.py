"""Event simulation of a schedule with costs: timeline, makespan, bubbles, peak memory, p2p volume.

Each rank runs its compute actions in order; an action starts when its rank is free and its
inputs are there (a cross-rank input arrives ``latency + bytes / bandwidth`` after its producer
ends; a same-rank hand-over, such as the V turn, is free). Replica gradient syncs start at a
stage's REDUCE_GRAD once both replicas reached it, run on a separate channel per rank and overlap
compute; the step ends when the last compute and the last sync end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from megatron_bitpipe.schedules.dataflow import compile_rules, run
from megatron_bitpipe.schedules.errors import ScheduleError
from megatron_bitpipe.schedules.ir import COMPUTE_KINDS, Action, Kind, Schedule


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """Model and batch sizes, for bytes: per-layer activation stash, messages, gradients."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    micro_batch_size: int = 1
    vocab_size: int = 50304
    bytes_per_value: int = 2

    def message_bytes(self) -> int:
        """One boundary activation (or its gradient): s * b * h values."""
        return self.seq_length * self.micro_batch_size * self.hidden_size * self.bytes_per_value

    def layer_activation_bytes(self) -> int:
        """Stash of one layer for one microbatch, s*b*h*(34 + 5*a*s/h) bytes at 16 bit
        (Korthikanti et al. 2022, no recompute), scaled to ``bytes_per_value``."""
        s, b, h, a = self.seq_length, self.micro_batch_size, self.hidden_size, self.num_attention_heads
        return int(s * b * h * (34 + 5 * a * s / h) * self.bytes_per_value / 2)

    def layer_parameter_count(self) -> int:
        return 12 * self.hidden_size * self.hidden_size + 13 * self.hidden_size


@dataclass(frozen=True, kw_only=True)
class Costs:
    """Durations per stage action (any time unit) and the communication model.

    ``input_grad``/``weight_grad`` default to half of ``backward`` each. ``stage_extra`` adds time
    to stages by position in their pipeline: ``{0: embedding_time, -1: head_and_loss_time}``.
    Messages cost ``latency + message_bytes / bandwidth``; a replica sync of one stage costs
    ``sync_latency + 2 * stage_grad_bytes / sync_bandwidth`` (a 2-rank all-reduce). With
    ``rank_nodes`` (the node of each rank), a message or sync between ranks of two nodes uses
    ``inter_node_latency`` and ``inter_node_bandwidth`` instead.
    """

    forward: float = 1.0
    backward: float = 2.0
    input_grad: float | None = None
    weight_grad: float | None = None
    stage_extra: dict[int, tuple[float, float]] = field(default_factory=dict)
    latency: float = 0.0
    bandwidth: float = math.inf
    message_bytes: int = 0
    sync_latency: float = 0.0
    sync_bandwidth: float = math.inf
    stage_grad_bytes: int = 0
    rank_nodes: tuple[int, ...] = ()
    inter_node_latency: float = 0.0
    inter_node_bandwidth: float = math.inf
    rank_time_factors: tuple[float, ...] = ()
    """Per rank, a factor on its compute durations (a rank on a slower core > 1); none: 1."""

    def duration(self, action: Action, position: int, stages_per_pipeline: int) -> float:
        """Duration of compute ``action`` on a stage at ``position`` of its pipeline."""
        base = {
            Kind.F: self.forward,
            Kind.B: self.backward,
            Kind.I: self.backward / 2 if self.input_grad is None else self.input_grad,
            Kind.W: self.backward / 2 if self.weight_grad is None else self.weight_grad,
        }[action.kind]
        for extra in (self.stage_extra.get(key) for key in self._extra_keys(position, stages_per_pipeline)):
            if extra:
                forward_extra, backward_extra = extra
                base += forward_extra if action.kind is Kind.F else (backward_extra if action.kind in (Kind.B, Kind.I) else 0.0)
        return base

    @staticmethod
    def _extra_keys(position: int, stages_per_pipeline: int) -> tuple[int, ...]:
        """``stage_extra`` keys that apply at ``position``: itself and its offset from the end
        (both 0 and -1 on a pipeline of one stage)."""
        from_end = position - stages_per_pipeline
        return (position,) if from_end == position else (position, from_end)

    def message_time(self, source: int, target: int) -> float:
        """One activation (or gradient) message from rank ``source`` to rank ``target``."""
        return self._transfer(source, target, self.message_bytes, self.latency, self.bandwidth)

    def sync_time(self, rank: int, partner: int) -> float:
        """The replica all-reduce of one stage's gradients between ``rank`` and ``partner``."""
        return self._transfer(rank, partner, 2 * self.stage_grad_bytes, self.sync_latency, self.sync_bandwidth)

    def _transfer(self, rank: int, other: int, size: int, latency: float, bandwidth: float) -> float:
        """``size`` bytes between two ranks: on the given link inside a node, else the inter-node one."""
        if self.rank_nodes and self.rank_nodes[rank] != self.rank_nodes[other]:
            latency, bandwidth = self.inter_node_latency, self.inter_node_bandwidth
        return latency + (size / bandwidth if size else 0.0)


class Event(NamedTuple):
    """One action's simulated (or measured) span on one rank (a named tuple: cheap to make)."""

    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    """What a simulation reports; all per-rank tuples are indexed by rank."""

    name: str
    makespan: float
    events: tuple[Event, ...]
    sync_events: tuple[Event, ...]
    busy: tuple[float, ...]
    peak_activations: tuple[int, ...]
    p2p_messages: int
    p2p_bytes: int
    peak_activation_bytes: tuple[int, ...] | None = None

    @property
    def bubble(self) -> tuple[float, ...]:
        """Idle fraction of the step, per rank."""
        return tuple(1.0 - busy / self.makespan for busy in self.busy)

    @property
    def bubble_ratio(self) -> float:
        """Total idle time over total time, all ranks."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)

    @property
    def idle(self) -> tuple[float, ...]:
        return tuple(self.makespan - busy for busy in self.busy)


def simulate(schedule: Schedule, costs: Costs | None = None, dims: ModelDims | None = None) -> SimResult:
    """Simulate ``schedule`` (compute-only or lowered) with ``costs``; bytes need ``dims``."""
    costs = costs or Costs()
    if dims is not None and costs.message_bytes == 0:
        costs = _with_bytes(costs, schedule, dims)
    events = timeline(schedule, costs)
    sync_events = _syncs(schedule, events, costs)
    ends = [event.end for event in events] + [event.end for event in sync_events]
    makespan = max(ends, default=0.0)
    busy = [0.0] * schedule.num_ranks
    for event in events:
        busy[event.rank] += event.end - event.start
    peaks = peak_activations(schedule)
    messages = _count_messages(schedule)
    stash_bytes = None
    if dims is not None:
        per_chunk = dims.layer_activation_bytes() * _layers_per_stage(schedule, dims)
        stash_bytes = tuple(peak * per_chunk for peak in peaks)
    return SimResult(
        name=schedule.name,
        makespan=makespan,
        events=tuple(events),
        sync_events=tuple(sync_events),
        busy=tuple(busy),
        peak_activations=peaks,
        p2p_messages=messages,
        p2p_bytes=messages * costs.message_bytes,
        peak_activation_bytes=stash_bytes,
    )


def peak_activations(schedule: Schedule) -> tuple[int, ...]:
    """Most chunk activations stashed at once per rank: +1 at F, -1 after B (or after W if split)."""
    peaks = []
    for program in schedule.compute_programs():
        split = {(a.stage, a.microbatch) for a in program if a.kind is Kind.W}
        live = peak = 0
        for action in program:
            if action.kind is Kind.F:
                live += 1
                peak = max(peak, live)
            elif action.kind is Kind.W or (action.kind is Kind.B and (action.stage, action.microbatch) not in split):
                live -= 1
        peaks.append(peak)
    return tuple(peaks)


def timeline(schedule: Schedule, costs: Costs) -> list[Event]:
    """Time every compute action (each rank's in program order); raise ScheduleError if the
    programs cannot all finish.

    ``dataflow.run`` gives the order actions become ready; each then starts when its rank is free
    and every fact it needs has arrived: ``ready_at[fact]`` is when the fact exists on its
    producer's rank, plus a message's time when that is another rank.
    """
    programs = schedule.compute_programs()
    durations = _durations(schedule, costs)
    arrival_delay = _arrival_delays(len(programs), costs)
    rules = compile_rules(schedule, messages=False)
    outcome = run(programs, rules)
    if outcome.blocked:
        where = ", ".join(f"rank {rank} at {programs[rank][position]}" for rank, position, _ in outcome.blocked)
        raise ScheduleError(f"{schedule.name}: simulation cannot progress (deadlock): {where}")
    table, per_microbatch = rules.table, rules.facts_per_microbatch
    ready_at = [0.0] * rules.num_facts
    free_at = [0.0] * len(programs)
    events: list[Event] = []
    for rank, first_position, end_position in outcome.runs:
        program = programs[rank]
        delay = arrival_delay[rank]
        clock = free_at[rank]
        for position in range(first_position, end_position):
            action = program[position]
            stage, kind, microbatch = action
            shift = microbatch * per_microbatch
            needs, makes = table[kind][stage]
            start = clock
            for fact, producer in needs:
                at = ready_at[fact + shift] + delay[producer]
                if at > start:
                    start = at
            clock = start + durations[kind][stage]
            events.append(Event(rank, action, start, clock))
            for fact in makes:
                ready_at[fact + shift] = clock
        free_at[rank] = clock
    return events


def _durations(schedule: Schedule, costs: Costs) -> dict[Kind, list[float]]:
    """``durations[kind][stage]``: how long that compute action takes on its stage's rank."""
    placement = schedule.placement
    stage_rank = placement.stage_ranks
    factors = costs.rank_time_factors or (1.0,) * placement.num_ranks
    return {
        kind: [
            costs.duration(Action(stage, kind, 0), placement.position(stage), placement.stages_per_pipeline)
            * factors[stage_rank[stage]]
            for stage in range(placement.num_stages)
        ]
        for kind in COMPUTE_KINDS
    }


def _arrival_delays(num_ranks: int, costs: Costs) -> list[list[float]]:
    """``delays[target][source]``: a message's time from ``source`` to ``target``; 0 on one rank."""
    ranks = range(num_ranks)
    return [[0.0 if source == target else costs.message_time(source, target) for source in ranks] for target in ranks]


def _syncs(schedule: Schedule, events: list[Event], costs: Costs) -> list[Event]:
    """Replica syncs: start once both replicas reached REDUCE_GRAD, one at a time per rank."""
    if not schedule.is_lowered:
        return []
    placement = schedule.placement
    end_of = {(event.rank, event.action): event.end for event in events}
    issue: dict[tuple[int, int], float] = {}
    order: list[list[int]] = []
    for rank, program in enumerate(schedule.programs):
        clock = 0.0
        stages = []
        for action in program:
            if action.is_compute:
                clock = end_of[(rank, action)]
            elif action.kind is Kind.REDUCE_GRAD:
                issue[(rank, action.stage)] = clock
                stages.append(action.stage)
        order.append(stages)
    channel = [0.0] * schedule.num_ranks
    result = []
    for rank, stages in enumerate(order):
        partner = placement.num_ranks - 1 - rank if placement.num_pipelines == 2 else rank
        if partner < rank:
            continue
        partner_stage = {placement.position(stage): stage for stage in order[partner]}
        for stage in stages:
            other = partner_stage[placement.position(stage)]
            start = max(issue[(rank, stage)], issue[(partner, other)], channel[rank], channel[partner])
            end = start + costs.sync_time(rank, partner)
            channel[rank] = channel[partner] = end
            result.append(Event(rank, Action(stage, Kind.REDUCE_GRAD), start, end))
            if partner != rank:
                result.append(Event(partner, Action(other, Kind.REDUCE_GRAD), start, end))
    return result


def _count_messages(schedule: Schedule) -> int:
    placement = schedule.placement
    count = 0
    for rank, program in enumerate(schedule.compute_programs()):
        for action in program:
            if action.kind is Kind.F:
                target = placement.next_stage(action.stage)
            elif action.kind in (Kind.B, Kind.I):
                target = placement.prev_stage(action.stage)
            else:
                continue
            if target is not None and placement.rank_of(target) != rank:
                count += 1
    return count


def _layers_per_stage(schedule: Schedule, dims: ModelDims) -> int:
    per_pipeline = schedule.placement.stages_per_pipeline
    if dims.num_layers % per_pipeline:
        raise ValueError(
            f"--num-layers {dims.num_layers} must be divisible by the {per_pipeline} stages of "
            f"{schedule.name}'s pipeline"
        )
    return dims.num_layers // per_pipeline


def _with_bytes(costs: Costs, schedule: Schedule, dims: ModelDims) -> Costs:
    layers = _layers_per_stage(schedule, dims)
    grad_bytes = layers * dims.layer_parameter_count() * 4
    return replace(costs, message_bytes=dims.message_bytes(), stage_grad_bytes=grad_bytes)
