"""Per-layer costs of megatron-core's GPT layer on this machine's GPU, as a cluster's layer_costs file.

    python scripts/measure_layer_costs.py --out configs/h200_layer_costs.json [--shapes paper-gpt,...]

For each shape: a TransformerBlock of ``--layers`` layers (local spec, or Transformer Engine's
when importable) in bf16; forward and full backward timed with CUDA events, median of
``--repeats`` after ``--warmup``, divided by the number of layers. Also the embedding forward
and the output layer plus cross-entropy (forward and backward) for each (hidden, seq,
micro-batch, vocab). Writes the format of configs/h100_layer_costs.json, so a cluster config can
name it as ``layer_costs``. On a CPU it runs too (fp32, host timers), for checking the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

SHAPES = {
    # name: (hidden, heads, seq, micro-batch, vocab)
    "paper-gpt": (3072, 32, 1024, 1, 50304),
    "paper-bert": (2560, 64, 512, 4, 30592),
    "gpt3-1.3b": (2048, 16, 2048, 1, 50304),
    "gpt3-6.7b": (4096, 32, 2048, 1, 50304),
    "gpt3-13b": (5120, 40, 2048, 1, 50304),
    "gpu-check": (2048, 16, 1024, 4, 32000),
    "tiny": (64, 4, 64, 2, 128),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="paper-gpt,paper-bert,gpt3-1.3b,gpt3-6.7b,gpt3-13b,gpu-check")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    _init()
    from megatron.core import package_info

    cuda = torch.cuda.is_available()
    device = f"{torch.cuda.get_device_name()}" if cuda else "CPU"
    rows, heads = [], []
    for name in args.shapes.split(","):
        hidden, heads_count, seq, micro_batch, vocab = SHAPES[name]
        forward, backward, activation = _layer(hidden, heads_count, seq, micro_batch, args)
        rows.append({"model": name, "hidden": hidden, "heads": heads_count, "seq": seq, "micro_batch": micro_batch,
                     "forward_ms": round(forward, 3), "backward_ms": round(backward, 3),
                     "activation_mib": round(activation / 2**20, 1)})
        embedding, head = _head(hidden, seq, micro_batch, vocab, args)
        heads.append({"hidden": hidden, "seq": seq, "micro_batch": micro_batch, "vocab": vocab,
                      "embedding_forward_ms": round(embedding, 3),
                      "output_layer_and_loss_forward_backward_ms": round(head, 3)})
        print(f"{name}: layer F {forward:.3f} ms, B {backward:.3f} ms; head F+B {head:.3f} ms", flush=True)
    spec = "Transformer Engine spec" if _has_transformer_engine() else "local spec"
    document = {
        "what": f"time of one megatron-core GPT transformer layer ({spec}), {'bf16' if cuda else 'fp32'}, "
                f"one {device}, torch {torch.__version__}, megatron-core {package_info.__version__}. Median of "
                f"{args.repeats} timed runs of a {args.layers}-layer TransformerBlock after {args.warmup} warm-ups, "
                f"divided by {args.layers} (scripts/measure_layer_costs.py). backward_ms is the full backward.",
        "layers": rows,
        "head": heads,
    }
    with open(args.out, "w") as handle:
        json.dump(document, handle, indent=1)
    print(f"wrote {args.out}")


def _init() -> None:
    from megatron_bitpipe.mcore.local_world import init_single_process

    init_single_process()


def _dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _config(hidden: int, heads: int, layers: int):
    from megatron.core.transformer import TransformerConfig

    from megatron_bitpipe.mcore.cpu import config_overrides

    cuda = torch.cuda.is_available()
    extra = {} if cuda else config_overrides()
    return TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                             params_dtype=_dtype(), bf16=cuda, hidden_dropout=0.0, attention_dropout=0.0,
                             **extra)


def _layer(hidden: int, heads: int, seq: int, micro_batch: int, args: argparse.Namespace) -> tuple[float, float, int]:
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_bitpipe.mcore.specs import layer_spec

    config = _config(hidden, heads, args.layers)
    block = TransformerBlock(config, layer_spec(config, args.layers)).to(_device(), _dtype())
    inputs = torch.randn(seq, micro_batch, hidden, device=_device(), dtype=_dtype(), requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def forward() -> None:
        state["out"] = block(inputs, attention_mask=None)  # the causal mask of the spec

    def backward() -> None:
        state["out"].backward(torch.ones_like(state["out"]))

    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    forward_ms, backward_ms = _time_pair(forward, backward, args)
    forward()
    activation = (torch.cuda.memory_allocated() - before) if torch.cuda.is_available() else 0
    backward()
    del block, state
    return forward_ms / args.layers, backward_ms / args.layers, activation // args.layers


def _head(hidden: int, seq: int, micro_batch: int, vocab: int, args: argparse.Namespace) -> tuple[float, float]:
    embedding = torch.nn.Embedding(vocab, hidden).to(_device(), _dtype())
    tokens = torch.randint(0, vocab, (micro_batch, seq), device=_device())
    hidden_states = torch.randn(seq, micro_batch, hidden, device=_device(), dtype=_dtype(), requires_grad=True)
    labels = torch.randint(0, vocab, (seq * micro_batch,), device=_device())

    def embed() -> None:
        with torch.no_grad():
            embedding(tokens)

    def head() -> None:
        logits = torch.nn.functional.linear(hidden_states, embedding.weight).float()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), labels)
        loss.backward()

    return _time(embed, args), _time(head, args)


def _time(step: Callable[[], None], args: argparse.Namespace) -> float:
    return statistics.median(_samples(step, args))


def _time_pair(first: Callable[[], None], second: Callable[[], None], args: argparse.Namespace) -> tuple[float, float]:
    pairs = []
    for index in range(args.warmup + args.repeats):
        start = mark()
        first()
        middle = mark()
        second()
        end = mark()
        if index >= args.warmup:
            pairs.append((start, middle, end))
    sync()
    return (statistics.median(elapsed(a, b) for a, b, _ in pairs),
            statistics.median(elapsed(b, c) for _, b, c in pairs))


def _samples(step: Callable[[], None], args: argparse.Namespace) -> list[float]:
    marks = []
    for index in range(args.warmup + args.repeats):
        start = mark()
        step()
        end = mark()
        if index >= args.warmup:
            marks.append((start, end))
    sync()
    return [elapsed(start, end) for start, end in marks]


def mark():
    if torch.cuda.is_available():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed(start, end) -> float:
    if torch.cuda.is_available():
        return start.elapsed_time(end)
    return (end - start) * 1e3


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _has_transformer_engine() -> bool:
    from megatron_bitpipe.mcore.specs import transformer_engine_available

    return transformer_engine_available()


if __name__ == "__main__":
    main()
