"""Put this process at its place in the pipeline: ``schedules.rank_order`` applied to ``RANK``."""

from __future__ import annotations

import os

from megatron_bitpipe.schedules.rank_order import CONSECUTIVE, logical_global_rank

LAUNCH_RANK_VARIABLE = "MEGATRON_BITPIPE_LAUNCH_RANK"
"""The rank the launcher gave a process whose ``RANK`` was rewritten."""


def apply_to_environment(pipeline_parallel: int, ranks_per_slot: int, order: str) -> None:
    """Rewrite ``RANK`` (set by torchrun or by hand) to this process's logical global rank.

    Called before the process group exists. ``LOCAL_RANK`` (the GPU) is left alone: the process
    keeps its node and device and takes another place in the pipeline.
    """
    if order == CONSECUTIVE or "RANK" not in os.environ:
        return
    physical = int(os.environ["RANK"])
    os.environ[LAUNCH_RANK_VARIABLE] = str(physical)
    os.environ["RANK"] = str(logical_global_rank(physical, pipeline_parallel, ranks_per_slot, order))
