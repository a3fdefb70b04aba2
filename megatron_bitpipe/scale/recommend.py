"""Which schedule and parallel layout to use for a model on G GPUs, according to the simulator.

``candidates`` enumerates TP (dividing a node, dividing the heads) x PP x DP = G, every registry
schedule with vp 2 and 4 where it takes one, and both rank orders for two-pipeline schedules, at
the model's global batch size. ``recommend`` predicts them all and ranks those that fit in
memory by tokens/s. ``why_slower`` says what a runner-up loses against the winner: more bubble,
more communication, more compute per GPU, a slower optimizer step, or memory; ``breakdown``
splits a predicted step into its parts.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_bitpipe.scale.config import ClusterConfig, Layout, ModelConfig
from megatron_bitpipe.scale.cost_model import GIB, Prediction, layer_costs, predict
from megatron_bitpipe.schedules import registry

EXCLUDED = ("gpipe",)
"""Never a winner at equal memory, and its stash grows with N: left out of the search."""


@dataclass(frozen=True)
class Recommendation:
    """The ranked predictions (fitting ones, fastest first) and those left out with a reason."""

    ranked: tuple[Prediction, ...]
    left_out: tuple[Prediction, ...]

    @property
    def winner(self) -> Prediction | None:
        return self.ranked[0] if self.ranked else None


def candidates(model: ModelConfig, cluster: ClusterConfig, gpus: int) -> list[tuple[Layout, int]]:
    """Every (layout, microbatches) on ``gpus`` GPUs at the model's global batch size."""
    found = []
    for tp in (1, 2, 4, 8):
        if tp > cluster.gpus_per_node or gpus % tp or model.num_attention_heads % tp:
            continue
        for pp in range(2, gpus // tp + 1):
            if (gpus // tp) % pp:
                continue
            dp = gpus // (tp * pp)
            if model.global_batch_size % (model.micro_batch_size * dp):
                continue
            microbatches = model.global_batch_size // (model.micro_batch_size * dp)
            for schedule in registry.names():
                if schedule in EXCLUDED:
                    continue
                spec = registry.get(schedule)
                vps = (2, 4) if "vp" in spec.options else (None,)
                orders = ("consecutive", "replica-pairs") if spec.bidirectional else ("consecutive",)
                for vp in vps:
                    for order in orders:
                        found.append((Layout(schedule, pp, tp, dp, vp, None, order), microbatches))
    return found


def recommend(model: ModelConfig, cluster: ClusterConfig, gpus: int) -> Recommendation:
    """All candidates predicted: the fitting ones ranked by tokens/s, the others with a reason."""
    if gpus <= 0:
        raise ValueError(f"--gpus {gpus}: must be positive")
    costs = layer_costs(model, cluster)
    predictions = [predict(model, cluster, layout, microbatches, costs=costs)
                   for layout, microbatches in candidates(model, cluster, gpus)]
    ranked = sorted((p for p in predictions if p.fits), key=lambda p: -p.tokens_per_s)
    left_out = [p for p in predictions if not p.fits]
    return Recommendation(tuple(ranked), tuple(left_out))


BREAKDOWN_PARTS = ("compute", "pipeline idle", "replica sync", "data parallel", "optimizer", "other")


def best_per_schedule(found: Recommendation) -> list[Prediction]:
    """The fastest fitting layout of each schedule, fastest first."""
    best: dict[str, Prediction] = {}
    for prediction in found.ranked:
        best.setdefault(prediction.layout.schedule, prediction)
    return list(best.values())


def breakdown(prediction: Prediction) -> dict[str, float]:
    """The predicted step in ms by ``BREAKDOWN_PARTS``: the busiest rank's compute, the rest of
    the pipeline's makespan (bubbles, messages, the replica syncs that end after the compute),
    the data-parallel all-reduce, the optimizer step and the rest. ``replica sync`` is the mean
    per rank of the syncs' own time, overlapped or not (part of the makespan, not added)."""
    return {
        "compute": prediction.compute_ms,
        "pipeline idle": prediction.pipeline_ms - prediction.compute_ms,
        "replica sync": prediction.sync_ms,
        "data parallel": prediction.data_parallel_ms,
        "optimizer": prediction.optimizer_ms,
        "other": prediction.other_ms,
    }


def why_slower(prediction: Prediction, winner: Prediction) -> str:
    """The biggest of the costs ``prediction`` pays beyond ``winner``, in words and figures."""
    if prediction.invalid:
        return prediction.invalid
    if not prediction.fits:
        return (f"does not fit: {prediction.peak_memory_bytes / GIB:.1f} GiB > "
                f"{prediction.memory_limit_bytes / GIB:.1f} GiB usable")
    bubble = (prediction.pipeline_ms - prediction.compute_ms) - (winner.pipeline_ms - winner.compute_ms)
    reasons = {
        f"more bubble ({100 * prediction.bubble:.1f}% idle vs {100 * winner.bubble:.1f}%)": bubble,
        f"more communication (data-parallel all-reduce {prediction.data_parallel_ms:.0f} ms vs "
        f"{winner.data_parallel_ms:.0f} ms)": prediction.data_parallel_ms - winner.data_parallel_ms,
        f"more compute per GPU ({prediction.compute_ms:.0f} ms vs {winner.compute_ms:.0f} ms: "
        f"tensor-parallel all-reduces or a heavier stage)": prediction.compute_ms - winner.compute_ms,
        f"slower optimizer step ({prediction.optimizer_ms:.0f} ms vs {winner.optimizer_ms:.0f} ms: "
        f"more parameters per GPU)": prediction.optimizer_ms - winner.optimizer_ms,
    }
    reason, loss = max(reasons.items(), key=lambda item: item[1])
    return reason if loss > 0 else "about as fast (within the model's precision)"

