"""From a model, a cluster and a layout to a predicted step: time, tokens/s, memory, and why.

Compute costs come from the cluster's measured per-layer file when it has the model's row
(hidden, heads, seq, micro-batch), else from FLOP counts at the nearest row's achieved rate (or
the cluster's ``achieved_tflops``). Tensor parallelism divides a layer's compute by TP and adds
two all-reduces of the layer's output per forward and two per backward, on NVLink. A backward
split into I and W costs the cluster's measured ratios of a whole backward, and every action
pays the cluster's fixed ``action_overhead_ms`` plus ``layer_overhead_ms`` per layer. Pipeline
messages and replica syncs use the links between the nodes their ranks run on (``rank_order``).
The data-parallel all-reduce overlaps the backward except for the last chunk's gradients; the
optimizer step streams each parameter's state once through HBM. Memory is weights, gradients and
Adam state (18 bytes per parameter in bf16/fp16, 16 in fp32; the optimizer's 12 divided by DP
with the distributed optimizer), the simulator's peak activation
stash divided by TP, and the logits of one microbatch on the ranks holding the loss.

This is a model, not a measurement: the bench measures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from megatron_bitpipe.scale.config import ClusterConfig, Layout, ModelConfig
from megatron_bitpipe.scale.rank_order import slot_of
from megatron_bitpipe.schedules import lower, registry
from megatron_bitpipe.schedules.ir import Schedule
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
        schedule = lower(registry.build(layout.schedule, layout.pipeline_parallel, microbatches, **layout.options()))
    except ValueError as error:
        return Prediction(model, cluster, layout, microbatches, invalid=str(error))
    stages = schedule.placement.stages_per_pipeline
    if model.num_layers % stages:
        return Prediction(model, cluster, layout, microbatches,
                          invalid=f"num_layers {model.num_layers} is not divisible by the {stages} stages per pipeline")
    costs = costs or layer_costs(model, cluster)
    simulated_costs = stage_costs(model, cluster, layout, schedule, costs)
    dims = _dims(model)
    result = simulate(schedule, simulated_costs, dims)
    layers = model.num_layers // stages
    parameters = _parameters_per_rank(model, layout, schedule, layers)
    data_parallel = _data_parallel_ms(cluster, layout, parameters, schedule.placement.chunks_per_rank)
    optimizer = parameters * OPTIMIZER_BYTES_MOVED / (HBM_GBPS * 1e6)
    state = int(parameters * _bytes_per_parameter(model, layout.data_parallel))
    activations = max(result.peak_activation_bytes or (0,)) // layout.tensor_parallel
    logits = _tokens(model) * model.vocab_size * 4 // layout.tensor_parallel
    step = result.makespan + data_parallel + optimizer
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
    return None


def stage_costs(model: ModelConfig, cluster: ClusterConfig, layout: Layout, schedule: Schedule,
                costs: LayerCosts) -> Costs:
    """Simulator costs (milliseconds, bytes per millisecond) of one stage of ``schedule``."""
    layers = model.num_layers // schedule.placement.stages_per_pipeline
    tp = layout.tensor_parallel
    tp_ms = 0.0
    if tp > 1:
        message = _tokens(model) * model.hidden_size * model.bytes_per_value
        tp_ms = 2 * (2 * (tp - 1) / tp * message / (cluster.intra_node_gbps * 1e6) + cluster.intra_node_latency_us / 1e3)
    ranks_per_slot = layout.tensor_parallel * layout.data_parallel
    nodes = tuple(
        slot_of(rank, layout.pipeline_parallel, layout.pipeline_rank_order) * ranks_per_slot // cluster.gpus_per_node
        for rank in range(layout.pipeline_parallel)
    )
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
