"""From a model, a cluster and a layout to a predicted step: time, tokens/s, memory, and why.

Compute costs come from the cluster's measured per-layer file when it has the model's row
(hidden, heads, seq, micro-batch), else from FLOP counts at the nearest row's achieved rate (or
the cluster's ``achieved_tflops``). Tensor parallelism divides a layer's compute by TP and adds
two all-reduces of the layer's output per forward and two per backward, on NVLink. A backward
split into I and W costs the cluster's measured ratios of a whole backward, and every action
pays the cluster's fixed ``action_overhead_ms`` plus ``layer_overhead_ms`` per layer. Pipeline
messages and replica syncs use the links between the nodes their ranks run on
(``schedules.rank_order``).
The data-parallel all-reduce overlaps the backward except for the last chunk's gradients; the
optimizer step streams each parameter's state once through HBM. Memory is weights, gradients and
Adam state (18 bytes per parameter in bf16/fp16, 16 in fp32; the optimizer's 12 divided by DP
with the distributed optimizer), the simulator's peak activation
stash divided by TP, and the logits of one microbatch on the ranks holding the loss.

A cluster with ``measured_costs`` (a ``costs.json`` fitted to a real run, ``scale/measured_costs.py``)
takes its step costs from that file instead, for a model of the measured shape only (``measured``
says what must match): F/B/I/W per layer and per action with the embedding and head extras (each
stage's from ``KindCost.chunk_ms`` at its layer count), the action overhead, message latency and
bandwidth and the replica sync per MB inside a node (the cluster's links across nodes, and
inside a node for what the run did not calibrate: 0 in the file), the exposed data-parallel
all-reduce at the same ms per MB times a ring's 2(DP-1)/DP, the optimizer step per parameter, the
measured gradient finalization and the step's other work. Memory is estimated as above.

This is a model, not a measurement: the bench measures.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_bitpipe.scale import measured_costs as fitted
from megatron_bitpipe.scale.config import ClusterConfig, Layout, ModelConfig
from megatron_bitpipe.schedules import lower, registry
from megatron_bitpipe.schedules.ir import Schedule
from megatron_bitpipe.schedules.rank_order import slot_of
from megatron_bitpipe.schedules.simulate import Costs, ModelDims, simulate

GIB = 2**30
GRAD_BYTES = 4
"""Gradients are reduced in fp32 (Megatron-LM's default for bf16: accumulate_allreduce_grads_in_fp32)."""
OPTIMIZER_BYTES_MOVED = 40
"""HBM bytes per parameter an Adam step reads and writes (main weight, grad, two moments, model weight)."""
HBM_GBPS = 3000.0


@dataclass(frozen=True)
class LayerCosts:
    """Milliseconds of one transformer layer and of the embedding and head, at TP=1."""

    forward_ms: float
    backward_ms: float
    embedding_forward_ms: float
    head_forward_ms: float
    head_backward_ms: float
    source: str


@dataclass(frozen=True)
class Prediction:
    """One layout's predicted step, or the reason it cannot run."""

    model: ModelConfig
    cluster: ClusterConfig
    layout: Layout
    microbatches: int
    step_ms: float = math.nan
    pipeline_ms: float = math.nan
    data_parallel_ms: float = 0.0
    optimizer_ms: float = 0.0
    compute_ms: float = math.nan
    bubble: float = math.nan
    sync_ms: float = 0.0
    peak_memory_bytes: int = 0
    state_bytes: int = 0
    invalid: str | None = None
    other_ms: float = 0.0
    """Measured costs only: the measured gradient finalization and the rest of the step (zeroing,
    the loss all-reduce), outside the pipeline, the data-parallel all-reduce and the optimizer."""

    @property
    def global_batch_size(self) -> int:
        return self.microbatches * self.model.micro_batch_size * self.layout.data_parallel

    @property
    def tokens_per_s(self) -> float:
        if self.invalid or not self.step_ms > 0:
            return 0.0
        return self.global_batch_size * self.model.seq_length / (self.step_ms / 1e3)

    @property
    def memory_limit_bytes(self) -> int:
        return int(self.cluster.gpu_memory_gib * self.cluster.memory_headroom * GIB)

    @property
    def fits(self) -> bool:
        return self.invalid is None and self.peak_memory_bytes <= self.memory_limit_bytes


def layer_costs(model: ModelConfig, cluster: ClusterConfig) -> LayerCosts:
    """Per-layer and head costs of ``model`` on one GPU of ``cluster`` (TP=1)."""
    costs = measured(model, cluster)
    if costs is not None:
        forward, backward = costs.kind("F"), costs.kind("B")
        return LayerCosts(forward.per_layer_ms, backward.per_layer_ms, forward.embedding_ms, forward.head_ms,
                          backward.head_ms, f"measured_costs {cluster.measured_costs} ({costs.basis})")
    rows, heads = _measured(cluster)
    exact = [row for row in rows if _matches(row, model)]
    if exact:
        row = exact[0]
        forward, backward, source = row["forward_ms"], row["backward_ms"], f"measured ({row['model']})"
        rate = _layer_flops(model) / (forward * 1e-3)
    elif rows and cluster.achieved_tflops is None:
        row = min(rows, key=lambda row: abs(row["hidden"] - model.hidden_size))
        rate = _row_flops(row) / (row["forward_ms"] * 1e-3)
        forward = _layer_flops(model) / rate * 1e3
        backward = forward * row["backward_ms"] / row["forward_ms"]
        source = f"scaled by FLOPs from {row['model']} ({rate / 1e12:.0f} TFLOP/s)"
    else:
        rate = (cluster.achieved_tflops or 0.0) * 1e12
        forward = _layer_flops(model) / rate * 1e3
        backward, source = 2 * forward, f"FLOPs at {cluster.achieved_tflops:g} TFLOP/s"
    head_rows = [head for head in heads if head["hidden"] == model.hidden_size and head["seq"] == model.seq_length
                 and head["micro_batch"] == model.micro_batch_size]
    if head_rows:
        total = head_rows[0]["output_layer_and_loss_forward_backward_ms"]
        embedding = head_rows[0]["embedding_forward_ms"]
    else:
        total = 3 * 2 * _tokens(model) * model.hidden_size * model.vocab_size / rate * 1e3
        embedding = 0.01 * forward
    return LayerCosts(forward, backward, embedding, total / 3, 2 * total / 3, source)


def predict(model: ModelConfig, cluster: ClusterConfig, layout: Layout, microbatches: int,
            *, costs: LayerCosts | None = None) -> Prediction:
    """Simulate ``layout`` of ``model`` on ``cluster`` with ``microbatches`` per step."""
    invalid = check_layout(model, cluster, layout)
    if invalid:
        return Prediction(model, cluster, layout, microbatches, invalid=invalid)
    try:
        schedule = lower(layout.choice.build(layout.pipeline_parallel, microbatches))
    except ValueError as error:
        return Prediction(model, cluster, layout, microbatches, invalid=str(error))
    stages = schedule.placement.stages_per_pipeline
    if model.num_layers % stages:
        return Prediction(model, cluster, layout, microbatches,
                          invalid=f"num_layers {model.num_layers} is not divisible by the {stages} stages per pipeline")
    fit = measured(model, cluster)
    costs = costs or layer_costs(model, cluster)
    simulated_costs = stage_costs(model, cluster, layout, schedule, costs)
    dims = _dims(model)
    result = simulate(schedule, simulated_costs, dims)
    layers = model.num_layers // stages
    parameters = _parameters_per_rank(model, layout, schedule, layers)
    chunks = schedule.placement.chunks_per_rank
    if fit is None:
        data_parallel = _data_parallel_ms(cluster, layout, parameters, chunks)
        optimizer, other = parameters * OPTIMIZER_BYTES_MOVED / (HBM_GBPS * 1e6), 0.0
    else:
        data_parallel = _measured_data_parallel_ms(fit, cluster, layout, parameters, chunks)
        optimizer = fit.optimizer_ms_per_mparam * parameters / 1e6
        other = fitted.finalize_ms(fit, schedule.placement.num_pipelines, result) + fit.step_other_ms
    state = int(parameters * _bytes_per_parameter(model, layout.data_parallel))
    activations = max(result.peak_activation_bytes or (0,)) // layout.tensor_parallel
    logits = _tokens(model) * model.vocab_size * 4 // layout.tensor_parallel
    step = result.makespan + data_parallel + optimizer + other
    return Prediction(
        model, cluster, layout, microbatches,
        step_ms=step,
        pipeline_ms=result.makespan,
        data_parallel_ms=data_parallel,
        optimizer_ms=optimizer,
        compute_ms=max(result.busy),
        bubble=result.bubble_ratio,
        sync_ms=sum(event.end - event.start for event in result.sync_events) / layout.pipeline_parallel,
        peak_memory_bytes=state + activations + logits,
        state_bytes=state,
        other_ms=other,
    )


def check_layout(model: ModelConfig, cluster: ClusterConfig, layout: Layout) -> str | None:
    """Why ``layout`` cannot run ``model`` on ``cluster`` (None when it can)."""
    if layout.schedule not in registry.names():
        return f"schedule {layout.schedule!r} is not in the registry ({', '.join(registry.names())})"
    if layout.tensor_parallel > cluster.gpus_per_node:
        return f"tensor_parallel {layout.tensor_parallel} spans nodes of {cluster.gpus_per_node} GPUs"
    if model.num_attention_heads % layout.tensor_parallel:
        return f"num_attention_heads {model.num_attention_heads} is not divisible by tensor_parallel {layout.tensor_parallel}"
    if layout.pipeline_rank_order == "replica-pairs" and not registry.get(layout.schedule).bidirectional:
        return f"replica-pairs places replicas; {layout.schedule} has one pipeline"
    if cluster.measured_costs is not None and layout.tensor_parallel > 1:
        return _tensor_parallel_refusal(cluster, layout)
    return None


def _tensor_parallel_refusal(cluster: ClusterConfig, layout: Layout) -> str:
    return (f"tensor_parallel {layout.tensor_parallel}: measured_costs {cluster.measured_costs} "
            f"was measured at tensor_parallel 1")


def measured(model: ModelConfig, cluster: ClusterConfig) -> fitted.MeasuredCosts | None:
    """The cluster's ``measured_costs`` (None without); ValueError, one line naming the setting,
    unless ``model`` has the measured hidden_size, num_attention_heads, seq_length and
    micro_batch_size, the measured activation's bytes per value (its precision) and the default
    ffn_hidden_size (4 x hidden_size: costs.json does not record it). num_layers may differ (the
    costs are per layer); vocab_size too (costs.json does not record it: the embedding and head
    extras are the measured model's)."""
    if cluster.measured_costs is None:
        return None
    costs = _load_measured(cluster.measured_costs)
    where = f"measured_costs {cluster.measured_costs}"
    missing = [name for name in fitted.MODEL_SIZES if getattr(costs, name) is None]
    if missing:
        raise ValueError(f"{where} does not record the measured {', '.join(missing)}, so it cannot be "
                         f"checked against model {model.name}")
    differ = [name for name in fitted.MODEL_SIZES if getattr(costs, name) != getattr(model, name)]
    if differ:
        measured_sizes = ", ".join(f"{name} {getattr(costs, name)}" for name in differ)
        model_sizes = ", ".join(f"{name} {getattr(model, name)}" for name in differ)
        raise ValueError(f"{where} was measured with {measured_sizes}; model {model.name} has {model_sizes}")
    values = costs.seq_length * costs.micro_batch_size * costs.hidden_size
    if costs.activation_bytes and costs.activation_bytes != values * model.bytes_per_value:
        raise ValueError(f"{where} was measured with {costs.activation_bytes / values:g}-byte activations; model "
                         f"{model.name} has precision {model.precision} ({model.bytes_per_value} bytes)")
    if model.ffn_hidden_size not in (None, 4 * model.hidden_size):
        raise ValueError(f"{where} assumes ffn_hidden_size 4 x hidden_size = {4 * model.hidden_size}; "
                         f"model {model.name} has ffn_hidden_size {model.ffn_hidden_size}")
    return costs


def _load_measured(path: str) -> fitted.MeasuredCosts:
    """``costs.json`` at ``path``, read again only when the file changed."""
    stat = Path(path).stat()
    return _load_measured_version(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _load_measured_version(path: str, mtime_ns: int, size: int) -> fitted.MeasuredCosts:
    return fitted.load(path)


def stage_costs(model: ModelConfig, cluster: ClusterConfig, layout: Layout, schedule: Schedule,
                costs: LayerCosts) -> Costs:
    """Simulator costs (milliseconds, bytes per millisecond) of one stage of ``schedule``;
    with the cluster's ``measured_costs``, those of ``measured_costs.simulator_costs`` at this
    model's layers per stage (``costs`` is then not used)."""
    layers = model.num_layers // schedule.placement.stages_per_pipeline
    tp = layout.tensor_parallel
    ranks_per_slot = layout.tensor_parallel * layout.data_parallel
    nodes = tuple(
        slot_of(rank, layout.pipeline_parallel, layout.pipeline_rank_order) * ranks_per_slot // cluster.gpus_per_node
        for rank in range(layout.pipeline_parallel)
    )
    fit = measured(model, cluster)
    if fit is not None:
        if tp > 1:
            raise ValueError(_tensor_parallel_refusal(cluster, layout))
        per_layer = fit.parameters_per_layer or _layer_parameters(model)
        base = fitted.simulator_costs(replace(fit, num_layers=model.num_layers, parameters_per_layer=per_layer),
                                      schedule)
        intra = {"latency": cluster.intra_node_latency_us / 1e3, "bandwidth": cluster.intra_node_gbps * 1e6}
        uncalibrated = {}  # a link the measured run did not calibrate (0 in costs.json): the cluster's
        if not (fit.message_latency_ms or fit.message_ms_per_mb):
            uncalibrated.update(intra)
        if not fit.sync_ms_per_mb:
            uncalibrated.update(sync_latency=intra["latency"], sync_bandwidth=intra["bandwidth"])
        return replace(base, rank_nodes=nodes, inter_node_latency=cluster.inter_node_latency_us / 1e3,
                       inter_node_bandwidth=cluster.inter_node_gbps * 1e6, **uncalibrated)
    tp_ms = 0.0
    if tp > 1:
        message = _tokens(model) * model.hidden_size * model.bytes_per_value
        tp_ms = 2 * (2 * (tp - 1) / tp * message / (cluster.intra_node_gbps * 1e6) + cluster.intra_node_latency_us / 1e3)
    overhead = cluster.action_overhead_ms + layers * cluster.layer_overhead_ms
    return Costs(
        forward=overhead + layers * (costs.forward_ms / tp + tp_ms),
        backward=overhead + layers * (costs.backward_ms / tp + tp_ms),
        input_grad=overhead + layers * (costs.backward_ms * cluster.input_grad_ratio / tp + tp_ms),
        weight_grad=overhead + layers * costs.backward_ms * cluster.weight_grad_ratio / tp,
        stage_extra={0: (costs.embedding_forward_ms, 0.0), -1: (costs.head_forward_ms / tp, costs.head_backward_ms / tp)},
        latency=cluster.intra_node_latency_us / 1e3,
        bandwidth=cluster.intra_node_gbps * 1e6,
        message_bytes=_tokens(model) * model.hidden_size * model.bytes_per_value,
        sync_latency=cluster.intra_node_latency_us / 1e3,
        sync_bandwidth=cluster.intra_node_gbps * 1e6,
        stage_grad_bytes=layers * _layer_parameters(model) * GRAD_BYTES // tp,
        rank_nodes=nodes,
        inter_node_latency=cluster.inter_node_latency_us / 1e3,
        inter_node_bandwidth=cluster.inter_node_gbps * 1e6,
    )


def _data_parallel_ms(cluster: ClusterConfig, layout: Layout, parameters: int, chunks: int) -> float:
    """The exposed part of the data-parallel gradient all-reduce: the last chunk's share."""
    dp = layout.data_parallel
    if dp == 1:
        return 0.0
    inside = layout.tensor_parallel * dp <= cluster.gpus_per_node
    bandwidth = cluster.intra_node_gbps if inside else cluster.inter_node_gbps
    latency = cluster.intra_node_latency_us if inside else cluster.inter_node_latency_us
    ring = 2 * (dp - 1) / dp * parameters * GRAD_BYTES / (bandwidth * 1e6)
    return ring / chunks + latency / 1e3


def _measured_data_parallel_ms(fit: fitted.MeasuredCosts, cluster: ClusterConfig, layout: Layout,
                               parameters: int, chunks: int) -> float:
    """``_data_parallel_ms`` at the measured all-reduce ms per MB (a two-rank calibration: a ring
    of DP ranks moves 2(DP-1)/DP times the bytes of one) when DP stays inside a node."""
    dp = layout.data_parallel
    if dp == 1 or layout.tensor_parallel * dp > cluster.gpus_per_node or not fit.sync_ms_per_mb:
        return _data_parallel_ms(cluster, layout, parameters, chunks)
    megabytes = parameters * GRAD_BYTES / 2**20
    return 2 * (dp - 1) / dp * megabytes * fit.sync_ms_per_mb / chunks


def _parameters_per_rank(model: ModelConfig, layout: Layout, schedule: Schedule, layers: int) -> int:
    """The most parameters any pipeline rank holds (layers of its chunks, embedding, head)."""
    placement = schedule.placement
    embedding = model.vocab_size * model.hidden_size
    most = 0
    for stages in placement.rank_stages:
        positions = {placement.position(stage) for stage in stages}
        count = len(stages) * layers * _layer_parameters(model)
        has_first, has_last = 0 in positions, placement.stages_per_pipeline - 1 in positions
        count += embedding * (has_first + (has_last and (model.untie_embeddings or not has_first)))
        most = max(most, count)
    return most // layout.tensor_parallel


def _bytes_per_parameter(model: ModelConfig, data_parallel: int) -> float:
    """Weights, gradients and Adam state per parameter (Megatron's mixed-precision layout)."""
    weights_and_grads = 4 + 4 if model.precision == "fp32" else 2 + 4
    optimizer = 8 if model.precision == "fp32" else 12
    if model.distributed_optimizer:
        return weights_and_grads + optimizer / data_parallel
    return weights_and_grads + optimizer


def _layer_parameters(model: ModelConfig) -> int:
    h = model.hidden_size
    ffn = model.ffn_hidden_size or 4 * h
    return 4 * h * h + 2 * h * ffn + 9 * h + ffn


def _layer_flops(model: ModelConfig) -> float:
    return _flops(model.hidden_size, model.seq_length, model.micro_batch_size, model.ffn_hidden_size)


def _row_flops(row: dict) -> float:
    return _flops(row["hidden"], row["seq"], row["micro_batch"])


def _flops(hidden: int, seq: int, micro_batch: int, ffn: int | None = None) -> float:
    """Forward FLOPs of one layer: QKV and projection GEMMs, the MLP, attention scores."""
    ffn = ffn or 4 * hidden
    return micro_batch * seq * (8 * hidden * hidden + 4 * hidden * ffn + 4 * seq * hidden)


def _tokens(model: ModelConfig) -> int:
    return model.micro_batch_size * model.seq_length


def _matches(row: dict, model: ModelConfig) -> bool:
    return (row["hidden"], row["heads"], row["seq"], row["micro_batch"]) == (
        model.hidden_size, model.num_attention_heads, model.seq_length, model.micro_batch_size)


def _measured(cluster: ClusterConfig) -> tuple[list[dict], list[dict]]:
    if cluster.layer_costs is None:
        return [], []
    data = json.loads(Path(cluster.layer_costs).read_text())
    return data.get("layers", []), data.get("head", [])


def _dims(model: ModelConfig) -> ModelDims:
    return ModelDims(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        seq_length=model.seq_length,
        micro_batch_size=model.micro_batch_size,
        vocab_size=model.vocab_size,
        bytes_per_value=model.bytes_per_value,
    )
