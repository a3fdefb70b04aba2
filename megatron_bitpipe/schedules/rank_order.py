"""Where each pipeline rank runs: megatron's consecutive order, or BitPipe's replica pairs.

Megatron lays global ranks out tensor-parallel fastest and pipeline slowest, so pipeline rank k
of a group sits in process slot k: ``global = slot * (TP * DP) + index``. With
``replica-pairs`` (the official BitPipe code's order) slot k runs pipeline rank k when k is even
and D-k when k is odd, so the replicas of every stage (ranks r and D-1-r) sit in adjacent slots:
on one node whenever a node holds two slots. The heavy replica gradient all-reduce then stays on
NVLink and only the small activation messages cross nodes. The map is its own inverse.

Pure arithmetic; ``runtime.rank_order`` applies it to a process's ``RANK``.
"""

from __future__ import annotations

CONSECUTIVE, REPLICA_PAIRS = "consecutive", "replica-pairs"
ORDERS = (CONSECUTIVE, REPLICA_PAIRS)


def check_order(order: str, pipeline_parallel: int) -> None:
    """Raise ValueError naming the rule when ``order`` cannot be used with D pipeline ranks."""
    if order not in ORDERS:
        raise ValueError(f"--pipeline-rank-order {order!r}: must be one of {', '.join(ORDERS)}")
    if order == REPLICA_PAIRS and pipeline_parallel % 2:
        raise ValueError(
            f"--pipeline-rank-order replica-pairs needs an even --pipeline-model-parallel-size "
            f"(pairs r and D-1-r), got {pipeline_parallel}"
        )


def slot_of(pipeline_rank: int, pipeline_parallel: int, order: str) -> int:
    """The process slot (megatron's position in the pipeline group) running ``pipeline_rank``."""
    if order == CONSECUTIVE or pipeline_rank % 2 == 0:
        return pipeline_rank
    return pipeline_parallel - pipeline_rank


def logical_global_rank(physical_rank: int, pipeline_parallel: int, ranks_per_slot: int, order: str) -> int:
    """The global rank a process takes in the process group, from its launcher-given rank."""
    slot, index = divmod(physical_rank, ranks_per_slot)
    if slot >= pipeline_parallel:
        raise ValueError(f"rank {physical_rank} is outside {pipeline_parallel} x {ranks_per_slot} ranks")
    return slot_of(slot, pipeline_parallel, order) * ranks_per_slot + index
