"""Gradient sync between the two replicas of a stage (bidirectional placements), torch only.

In Chimera and BitPipe, pipeline rank r and rank D-1-r hold the same layers (one copy per
pipeline, at the same position). Both copies start from identical weights, those of the down copy
(``broadcast_replica_parameters``), and their gradients are all-reduced as soon as a stage's last
backward is done (``ReplicaGradSync.start`` from the REDUCE_GRAD callback), overlapped with the
rest of the step; ``finish`` waits for all of them before the optimizer step.

megatron-core's DDP does this in ``mcore/``; this module serves toy tests and non-megatron users.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from megatron_bitpipe.runtime.watchdog import Watchdog
from megatron_bitpipe.schedules.placement import Placement

logger = logging.getLogger(__name__)


def replica_partner(num_ranks: int, rank: int) -> int:
    """The pipeline rank holding the other replica of ``rank``'s layers: D-1-r."""
    return num_ranks - 1 - rank


def replica_pair_groups(
    num_ranks: int, pipelines: Sequence[Sequence[int]] | None = None
) -> dist.ProcessGroup | None:
    """Create the group {r, D-1-r} of every pair in every pipeline; return the caller's.

    Collective: every process of the default group calls it with the same arguments.
    ``pipelines`` lists each pipeline-parallel group's global ranks (default: the whole world is
    one pipeline). Returns None for a rank paired with itself (the middle rank of an odd D) or
    outside all pipelines.
    """
    if pipelines is None:
        pipelines = [list(range(dist.get_world_size()))]
    me = dist.get_rank()
    own = None
    for ranks in pipelines:
        if len(ranks) != num_ranks:
            raise ValueError(f"a pipeline has {len(ranks)} ranks, expected {num_ranks}")
        for rank in range(num_ranks // 2):
            members = [ranks[rank], ranks[replica_partner(num_ranks, rank)]]
            group = dist.new_group(members)
            if me in members:
                own = group
    logger.debug("rank %d: replica group %s", me, "none" if own is None else "created")
    return own


def broadcast_replica_parameters(
    placement: Placement,
    rank: int,
    stage_parameters: Mapping[int, Sequence[torch.Tensor]],
    group: dist.ProcessGroup | None,
) -> None:
    """Make both replicas identical: every stage takes the weights of its down-pipeline copy.

    Collective over the pair ``group`` (from ``replica_pair_groups``); both ranks walk their
    stages by position, so the broadcasts match. ``stage_parameters[stage]`` lists a stage's
    parameters in a fixed order (its module's ``parameters()``).
    """
    if placement.num_pipelines != 2:
        raise ValueError(f"placement {placement.kind} has one pipeline: no replicas to pair")
    if group is None:
        return
    me = dist.get_rank()
    members = [dist.get_global_rank(group, index) for index in range(group.size())]
    others = [member for member in members if member != me]
    if len(others) != 1:
        raise ValueError(f"replica group of rank {me} must be a pair, has global ranks {members}")
    with torch.no_grad():
        for stage in sorted(placement.rank_stages[rank], key=placement.position):
            source = me if placement.pipeline_of(stage) == 0 else others[0]
            for parameter in stage_parameters[stage]:
                dist.broadcast(parameter.data, src=source, group=group)


@dataclass
class _Pending:
    work: dist.Work
    flat: torch.Tensor
    grads: list[torch.Tensor]


class ReplicaGradSync:
    """Eager async all-reduce of one stage's gradients within its replica group.

    Args:
        group: the replica pair (or pair x data-parallel) group; None makes every call a no-op.
        average: divide by the group size (each replica's loss scaled by 1 / its own microbatch
            count); False sums (losses scaled by 1 / all microbatches).
        timeout_s: the longest ``finish`` waits for one all-reduce.
        watchdog: enforce ``timeout_s`` without blocking the host (NCCL; see ``Watchdog``).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        *,
        average: bool = True,
        timeout_s: float = 300.0,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.group = group
        self.average = average
        self.timeout_s = timeout_s
        self.watchdog = watchdog
        self._pending: list[_Pending] = []

    def start(self, parameters: Iterable[torch.Tensor]) -> list[dist.Work]:
        """Launch the all-reduce of these parameters' grads (missing grads count as zeros).

        One flat buffer per dtype; the replica must pass the same shapes in the same order.
        """
        if self.group is None:
            return []
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            by_dtype.setdefault(parameter.grad.dtype, []).append(parameter.grad)
        works = []
        for dtype in sorted(by_dtype, key=str):
            grads = by_dtype[dtype]
            flat = torch.cat([grad.reshape(-1) for grad in grads])
            if self.average:
                flat.div_(dist.get_world_size(self.group))
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._pending.append(_Pending(work, flat, grads))
            works.append(work)
        return works

    def finish(self) -> None:
        """Wait for every started all-reduce and write the results back into the grads."""
        pending, self._pending = self._pending, []
        for entry in pending:
            failure = (
                f"rank {dist.get_rank()}: replica gradient all-reduce did not finish "
                f"within {self.timeout_s:g} s"
            )
            try:
                if self.watchdog is None:
                    entry.work.wait(timedelta(seconds=self.timeout_s))
                else:
                    self.watchdog.check()
                    entry.work.wait()
                    self.watchdog.watch(entry.work, self.timeout_s, failure)
            except RuntimeError as error:
                raise RuntimeError(f"{failure}: {error}") from error
            offset = 0
            for grad in entry.grads:
                grad.copy_(entry.flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    @property
    def num_pending(self) -> int:
        """All-reduces started and not yet finished."""
        return len(self._pending)
