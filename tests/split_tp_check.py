"""Run under torchrun with 2 processes: the split backward against the fused one at tensor
parallel 2 with sequence parallelism, without and with gradient accumulation fusion. Prints one
``split vs fused`` line per case and exits 1 if any differs by more than 1e-6."""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

import split_check  # noqa: E402
from megatron_bitpipe.mcore import cpu  # noqa: E402

BOUND = 1e-6


def main() -> int:
    cpu.apply()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    failed = 0
    for fusion in (False, True):
        worst = split_check.compare(sequence_parallel=True, fusion=fusion)
        worst = max(worst, _largest_over_ranks(worst))
        if dist.get_rank() == 0:
            print(f"split vs fused, TP=2 sequence parallel, fusion {fusion}: worst relative {worst:.1e}", flush=True)
        failed += worst > BOUND
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 1 if failed else 0


def _largest_over_ranks(value: float) -> float:
    import torch

    tensor = torch.tensor([value])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


if __name__ == "__main__":
    sys.exit(main())
