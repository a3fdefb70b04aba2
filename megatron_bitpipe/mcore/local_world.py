"""A one-process world for measuring and checking megatron layers outside a training run."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_bitpipe.mcore import cpu


def init_single_process(seed: int = 1234) -> None:
    """Default group of one process (NCCL on a GPU, else gloo with the CPU workarounds) and
    megatron's parallel state at tensor/pipeline parallel 1, with its RNG tracker seeded."""
    cpu.apply()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def close() -> None:
    """Undo ``init_single_process``."""
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
