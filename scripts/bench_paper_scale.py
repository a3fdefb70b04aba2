"""Paper-scale simulation: every schedule on the BitPipe paper's GPT (96 layers) from measured H100 costs.

Per-layer forward/backward times come from configs/h100_layer_costs.json (one H100, bf16,
megatron-core local spec); the output layer and loss are charged to each pipeline's last stage.
Messages and replica syncs are charged from tensor sizes and the link bandwidths below. Prints one
table per (PP, microbatches) with step time, bubble, peak stash and the speed-up over 1F1B and over
megatron-core's interleaved 1F1B.

    python scripts/bench_paper_scale.py [--pp 8] [--microbatches 16 32 64] [--p2p-gbps 25]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_bitpipe.schedules import lower, registry
from megatron_bitpipe.schedules.errors import ScheduleConfigError
from megatron_bitpipe.schedules.simulate import Costs, ModelDims, simulate

COSTS_FILE = Path(__file__).resolve().parent.parent / "configs" / "h100_layer_costs.json"
SCHEDULES = ["1f1b", "interleaved-1f1b", "breadth-first", "zb-h1", "v-half", "v-zb", "chimera", "bitpipe-official", "bitpipe", "bitpipe-zb"]


def paper_model() -> tuple[ModelDims, dict, dict]:
    """The BitPipe paper's GPT (96 layers, h 3072, 32 heads, seq 1024, micro-batch 1), bf16."""
    measured = json.loads(COSTS_FILE.read_text())
    layer = next(row for row in measured["layers"] if row["model"].startswith("BitPipe paper GPT"))
    head = next(row for row in measured["head"] if row["hidden"] == 3072)
    dims = ModelDims(num_layers=96, hidden_size=3072, num_attention_heads=32, seq_length=1024, micro_batch_size=1)
    return dims, layer, head


def stage_costs(schedule_name: str, num_ranks: int, dims: ModelDims, layer: dict, head: dict, args) -> tuple[Costs, int]:
    """Costs of one stage action: layers per stage x measured layer time, plus head and messages."""
    probe = registry.build(schedule_name, num_ranks, 2 * num_ranks, **_options(schedule_name))
    stages = probe.placement.stages_per_pipeline
    layers = dims.num_layers // stages
    head_backward = head["output_layer_and_loss_forward_backward_ms"] * 2 / 3
    head_forward = head["output_layer_and_loss_forward_backward_ms"] / 3
    costs = Costs(
        forward=layers * layer["forward_ms"],
        backward=layers * layer["backward_ms"],
        stage_extra={0: (head["embedding_forward_ms"], 0.0), -1: (head_forward, head_backward)},
        latency=args.latency_us / 1000,
        bandwidth=args.p2p_gbps * 1e6,  # bytes per ms
        message_bytes=dims.message_bytes(),
        sync_latency=args.latency_us / 1000,
        sync_bandwidth=args.sync_gbps * 1e6,
        stage_grad_bytes=layers * dims.layer_parameter_count() * args.grad_bytes,
    )
    return costs, layers


def _options(name: str) -> dict:
    return {"vp": 2} if "vp" in registry.get(name).options else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=8)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--p2p-gbps", type=float, default=25.0, help="pipeline link, GB/s (25: 200 Gb/s IB)")
    parser.add_argument("--sync-gbps", type=float, default=150.0, help="replica-pair all-reduce bus, GB/s (NVLink)")
    parser.add_argument("--latency-us", type=float, default=10.0)
    parser.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient value (4: fp32 main grads)")
    args = parser.parse_args()
    dims, layer, head = paper_model()
    print(
        f"BitPipe paper GPT: 96 layers, h 3072, seq 1024, micro-batch 1, bf16; H100 layer F {layer['forward_ms']} ms, "
        f"B {layer['backward_ms']} ms; p2p {args.p2p_gbps} GB/s, replica sync {args.sync_gbps} GB/s"
    )
    for num_microbatches in args.microbatches:
        rows = []
        for name in SCHEDULES:
            if name not in registry.names():
                continue
            try:
                costs, layers = stage_costs(name, args.pp, dims, layer, head, args)
                schedule = lower(registry.build(name, args.pp, num_microbatches, **_options(name)))
            except ScheduleConfigError as error:
                rows.append((name, None, str(error)))
                continue
            result = simulate(schedule, costs, dims)
            rows.append((name, result, layers))
        _print_table(args.pp, num_microbatches, rows)


def _print_table(num_ranks: int, num_microbatches: int, rows: list) -> None:
    times = {name: result.makespan for name, result, _ in rows if result is not None}
    print(f"\nPP={num_ranks}, {num_microbatches} microbatches per step")
    print(f"{'schedule':<18}{'step ms':>10}{'bubble %':>10}{'peak stash GiB':>16}{'vs 1f1b':>9}{'vs interleaved':>16}")
    for name, result, extra in rows:
        if result is None:
            print(f"{name:<18}  rejected: {extra}")
            continue
        stash = max(result.peak_activation_bytes or (0,)) / 2**30
        versus_1f1b = times.get("1f1b", float("nan")) / result.makespan
        versus_interleaved = times.get("interleaved-1f1b", float("nan")) / result.makespan
        print(
            f"{name:<18}{result.makespan:>10.1f}{100 * result.bubble_ratio:>10.1f}{stash:>16.1f}"
            f"{versus_1f1b:>8.2f}x{versus_interleaved:>15.2f}x"
        )


if __name__ == "__main__":
    main()
