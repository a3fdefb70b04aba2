"""What the split backward costs: F, B, I and W of megatron-core's GPT layer, per layer.

    .venv/bin/python scripts/bench_split.py [--shapes small,bench,wide] [--layers 2] [--threads 1]

One process, megatron's local spec, a ``TransformerBlock`` wrapped in megatron's DDP (so weight
gradients land in ``main_grad`` as in training); fp32 on a CPU, bf16 on a GPU. Per shape it times,
alternating, a forward (F), a full backward (B), the backward as an I (linear layers' weight
gradients queued in ``mcore.weight_grad_store``) and the W that computes them, median of
``--repeats`` after ``--warmup``, divided by the layer count. The last line is
``split: I/B=<ratio> (I+W)/B=<ratio>``, the medians over the shapes. A real split needs
I <= 0.7 B (I is on the critical path) and I + W <= 1.1 B (the split costs little extra).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure_layer_costs import elapsed, mark, sync  # noqa: E402 - the same device timers

SHAPES = {
    # name: (hidden, heads, seq, micro-batch)
    "small": (128, 4, 128, 2),
    "bench": (512, 8, 256, 2),
    "wide": (1024, 16, 256, 1),
    "tiny": (32, 4, 16, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,bench,wide")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one per rank in the 2-rank bench)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from megatron_bitpipe.mcore.local_world import init_single_process

    init_single_process()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    print(f"bench_split: {device}, {args.layers} layers per block, median of {args.repeats}")
    print(f"{'shape':8} {'hidden':>6} {'seq':>5} {'mb':>3} {'F ms':>8} {'B ms':>8} {'I ms':>8} {'W ms':>8} {'I/B':>6} {'W/B':>6} {'(I+W)/B':>8}")
    input_ratios, total_ratios = [], []
    for name in args.shapes.split(","):
        hidden, heads, seq, micro_batch = SHAPES[name]
        forward, backward, input_grad, weight_grad = _measure(hidden, heads, seq, micro_batch, args)
        input_ratios.append(input_grad / backward)
        total_ratios.append((input_grad + weight_grad) / backward)
        print(
            f"{name:8} {hidden:6d} {seq:5d} {micro_batch:3d} {forward:8.3f} {backward:8.3f} {input_grad:8.3f} "
            f"{weight_grad:8.3f} {input_grad / backward:6.2f} {weight_grad / backward:6.2f} {total_ratios[-1]:8.2f}",
            flush=True,
        )
    print(f"split: I/B={statistics.median(input_ratios):.2f} (I+W)/B={statistics.median(total_ratios):.2f}")


def _measure(hidden: int, heads: int, seq: int, micro_batch: int, args: argparse.Namespace) -> tuple[float, ...]:
    from megatron_bitpipe.mcore.weight_grad_store import STORE, install

    install()
    model = _model(hidden, heads, args.layers)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    inputs = torch.randn(seq, micro_batch, hidden, device=device, dtype=dtype)
    output_grad = torch.randn(seq, micro_batch, hidden, device=device, dtype=dtype)
    samples: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": []}
    for index in range(args.warmup + args.repeats):
        model.zero_grad_buffer()
        with model.no_sync():
            start = mark()
            output = model(inputs.requires_grad_(), attention_mask=None)
            forward_end = mark()
            output.backward(output_grad)
            backward_end = mark()
            output = model(inputs, attention_mask=None)
            split_start = mark()
            with STORE.deferring(index):
                output.backward(output_grad)
            input_end = mark()
            STORE.flush(index)
            weight_end = mark()
        sync()
        if index >= args.warmup:
            samples["F"].append(elapsed(start, forward_end))
            samples["B"].append(elapsed(forward_end, backward_end))
            samples["I"].append(elapsed(split_start, input_end))
            samples["W"].append(elapsed(input_end, weight_end))
    return tuple(statistics.median(samples[kind]) / args.layers for kind in "FBIW")


def _model(hidden: int, heads: int, layers: int) -> Any:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_bitpipe.mcore.cpu import config_overrides
    from megatron_bitpipe.mcore.specs import layer_spec

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, params_dtype=dtype, bf16=cuda,
        hidden_dropout=0.0, attention_dropout=0.0, **config_overrides(),
    )
    block = TransformerBlock(config, layer_spec(config, layers)).to("cuda" if cuda else "cpu", dtype)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return DistributedDataParallel(config, ddp_config, block)


if __name__ == "__main__":
    main()
