"""Idle and peak stash of ``bitpipe`` and ``bitpipe-zb`` against ``--max-stash``.

    .venv/bin/python scripts/bench_memory_knob.py [--ranks 4 8 16] [--units 4]

For each D, N = units * D, and every cap D, D + D/4, ..., 3D (and the default, 2D): idle per
rank (makespan - most busy rank) with F=1, B=2 (bitpipe) and F=I=W=1 (bitpipe-zb), and the
largest per-rank stash in chunk activations. Pure Python, no torch.
"""

from __future__ import annotations

import argparse

from megatron_bitpipe.schedules.registry import build
from megatron_bitpipe.schedules.simulate import Costs, simulate

COSTS = {
    "bitpipe": Costs(forward=1, backward=2),
    "bitpipe-zb": Costs(forward=1, backward=2, input_grad=1, weight_grad=1),
}


def row(name: str, num_ranks: int, num_microbatches: int, cap: int | None) -> tuple[float, int]:
    """(idle, peak) of ``name`` under ``cap`` (None: the default)."""
    result = simulate(build(name, num_ranks, num_microbatches, max_stash=cap), COSTS[name])
    return result.makespan - max(result.busy), max(result.peak_activations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--units", type=int, default=4, help="N = units * D")
    args = parser.parse_args()
    print("| D | N | max_stash | bitpipe idle | bitpipe peak | bitpipe-zb idle | bitpipe-zb peak |")
    print("|---|---|---|---|---|---|---|")
    for num_ranks in args.ranks:
        num_microbatches = args.units * num_ranks
        caps: list[int | None] = [None, *range(num_ranks, 3 * num_ranks + 1, max(1, num_ranks // 4))]
        for cap in caps:
            cells = [row(name, num_ranks, num_microbatches, cap) for name in COSTS]
            label = "default (2D)" if cap is None else str(cap)
            figures = " | ".join(f"{idle:g} | {peak}" for idle, peak in cells)
            print(f"| {num_ranks} | {num_microbatches} | {label} | {figures} |")


if __name__ == "__main__":
    main()
