"""The communicators a training step uses, created once and initialized in one global order.

A step of a lowered schedule talks over three kinds of communicator (``step_communicators``):

* one **channel** per direction of every pair of pipeline ranks that exchange messages. On NCCL
  the sends and receives of one communicator run in posting order on one stream; a group per
  direction lets a send to a peer and a receive from it run at once;
* the **pipeline** group (the loss values of schedules whose heads are not all on the last rank);
* each **replica pair** (bidirectional placements: the gradient sync of rank r with rank D-1-r).

NCCL creates a communicator at its first call, and that call blocks every member until all have
made it. The lowering's global order makes even that safe inside a step (``nccl_rules``), but a
missing or late peer should be found at set-up, with a message naming it, not in the first step:
``initialize_communicators`` touches every communicator at set-up, each rank walking the ones it
belongs to in increasing ``key`` order. That cannot deadlock: the
smallest communicator not yet initialized has every member already past all smaller ones, so all
of them are at it.

Groups are created by ``create_groups`` in one pass over one list that every process builds the
same way. ``new_group`` adds no barrier (torch >= 2.2 synchronizes after creation only with
``TORCH_DIST_INIT_BARRIER=1``); ``use_local_synchronization`` is not used because its hashed group
names depend on how many groups each process already created, which differs between ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_bitpipe.schedules.placement import Placement

logger = logging.getLogger(__name__)


class CommunicatorSetupError(RuntimeError):
    """A communicator could not be initialized; the text names the rank and the communicator."""


@dataclass(frozen=True)
class CommunicatorSpec:
    """One communicator: a p2p channel (``sender`` set) or a collective group."""

    name: str
    ranks: tuple[int, ...]
    sender: int | None = None

    @property
    def receiver(self) -> int | None:
        if self.sender is None:
            return None
        return next(rank for rank in self.ranks if rank != self.sender)

    @property
    def key(self) -> tuple[tuple[int, ...], str]:
        """The global initialization order: members first, then the name."""
        return (tuple(sorted(self.ranks)), self.name)

    def on(self, global_ranks: Sequence[int]) -> CommunicatorSpec:
        """The same communicator for the pipeline whose rank ``i`` is global rank ``global_ranks[i]``."""
        ranks = tuple(global_ranks[rank] for rank in self.ranks)
        sender = None if self.sender is None else global_ranks[self.sender]
        if sender is None:
            name = f"{self.name.split(' ')[0]} {','.join(map(str, ranks))}"
        else:
            name = f"channel {sender}->{ranks[1] if ranks[0] == sender else ranks[0]}"
        return CommunicatorSpec(name, ranks, sender)


def channel(sender: int, receiver: int) -> CommunicatorSpec:
    return CommunicatorSpec(f"channel {sender}->{receiver}", (sender, receiver), sender)


def message_pairs(placement: Placement) -> list[tuple[int, int]]:
    """Every (sender, receiver) pair that a schedule on ``placement`` can use, both directions."""
    pairs = set()
    for stage in range(placement.num_stages):
        following = placement.next_stage(stage)
        if following is not None and placement.rank_of(following) != placement.rank_of(stage):
            sender, receiver = placement.rank_of(stage), placement.rank_of(following)
            pairs.update({(sender, receiver), (receiver, sender)})
    return sorted(pairs)


def step_communicators(placement: Placement) -> list[CommunicatorSpec]:
    """Channels, the pipeline group and the replica pairs of one pipeline (pipeline ranks)."""
    specs = [channel(sender, receiver) for sender, receiver in message_pairs(placement)]
    if placement.num_ranks > 1:
        everyone = tuple(range(placement.num_ranks))
        specs.append(CommunicatorSpec(f"pipeline {','.join(map(str, everyone))}", everyone))
    if placement.num_pipelines == 2:
        for rank in range(placement.num_ranks // 2):
            pair = (rank, placement.num_ranks - 1 - rank)
            specs.append(CommunicatorSpec(f"replicas {pair[0]},{pair[1]}", pair))
    return specs


def initialization_order(specs: Iterable[CommunicatorSpec], rank: int) -> list[CommunicatorSpec]:
    """The communicators ``rank`` belongs to, in the global order ``initialize_communicators`` uses."""
    return sorted((spec for spec in specs if rank in spec.ranks), key=lambda spec: spec.key)


STREAM_POOL_SIZE = 32
"""CUDA streams per priority in torch's pool (c10 ``kStreamsPerPool``), handed out in turn: a
process holding more channels than this gives two of them one stream, where a send can queue
behind a receive of another channel and hang."""


def create_groups(
    specs: Sequence[CommunicatorSpec], *, timeout: timedelta | None = None
) -> dict[str, dist.ProcessGroup]:
    """``new_group`` for every spec (global ranks), in order; the caller's groups by name.

    Collective: every process calls it with the same list. Each group gets ``timeout`` (default:
    the default group's, which ``init_process_group`` took from the run's timeout) and, on
    NCCL, a high-priority stream (``channel_options``).
    """
    me = dist.get_rank()
    timeout = timeout or default_group_timeout()
    own: dict[str, dist.ProcessGroup] = {}
    for spec in specs:
        group = dist.new_group(
            list(spec.ranks),
            timeout=timeout,
            pg_options=channel_options(timeout),
            group_desc=spec.name.replace(" ", "_"),
        )
        if me in spec.ranks:
            own[spec.name] = group
    logger.debug("rank %d: created %d of %d communicators", me, len(own), len(specs))
    return own


def channel_options(timeout: timedelta | None) -> object | None:
    """NCCL options with a high-priority stream (torch's second pool of 32); None elsewhere."""
    if dist.get_backend() != "nccl":
        return None
    options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    if timeout is not None:
        options._timeout = timeout
    return options


def default_group_timeout() -> timedelta | None:
    """The timeout the default process group was created with; None where torch does not say."""
    group = dist.distributed_c10d._get_default_group()
    for device_type in getattr(group, "_device_types", ()):
        try:
            timeout = group._get_backend(device_type).options._timeout
        except (AttributeError, RuntimeError):
            continue
        if isinstance(timeout, timedelta):
            return timeout
    return None


def destroy_groups(groups: Iterable[dist.ProcessGroup]) -> None:
    """``destroy_process_group`` each group, in the order given: pass them in the global
    initialization order on every member, since some NCCL versions shut down collectively."""
    for group in groups:
        dist.destroy_process_group(group)


def initialize_communicators(
    communicators: Sequence[tuple[CommunicatorSpec, dist.ProcessGroup]],
    *,
    device: torch.device,
    timeout_s: float,
) -> None:
    """Make one call on each communicator of this rank, in the global order (module docstring).

    ``communicators`` holds this rank's specs (global ranks) with their groups. A channel moves
    one element from its sender to its receiver; a group all-reduces one element. The host waits
    for each (set-up, not the step), so a missing peer is reported, naming the communicator.
    """
    me = dist.get_rank()
    by_name = {spec.name: (spec, group) for spec, group in communicators}
    for spec in initialization_order((spec for spec, _ in communicators), me):
        _, group = by_name[spec.name]
        token = torch.zeros(1, device=device)
        if spec.sender is None:
            work = dist.all_reduce(token, group=group, async_op=True)
            peers = f"ranks {','.join(map(str, spec.ranks))}"
        elif spec.sender == me:
            work = dist.isend(token, dst=spec.receiver, group=group)
            peers = f"rank {spec.receiver}"
        else:
            work = dist.irecv(token, src=spec.sender, group=group)
            peers = f"rank {spec.sender}"
        try:
            work.wait(timedelta(seconds=timeout_s))
        except RuntimeError as error:
            raise CommunicatorSetupError(
                f"rank {me}: initializing {spec.name} with {peers} did not finish within "
                f"{timeout_s:g} s: {error}"
            ) from error
    logger.debug("rank %d: initialized %d communicators", me, len(by_name))


def build_channels(
    pairs: Iterable[tuple[int, int]],
    pipelines: list[list[int]] | None = None,
    *,
    timeout: timedelta | None = None,
) -> dict[tuple[int, int], dist.ProcessGroup]:
    """Create one group per ordered pair, for every pipeline; return the calling rank's by pair.

    Collective: every process of the default group calls it with the same arguments.
    ``pipelines`` lists the global ranks of each pipeline-parallel group (default: one pipeline,
    the whole world, pipeline rank = global rank); ``timeout`` as in ``create_groups``.
    """
    if pipelines is None:
        pipelines = [list(range(dist.get_world_size()))]
    pairs = sorted(set(pairs))
    specs = [channel(*pair).on(ranks) for ranks in pipelines for pair in pairs]
    groups = create_groups(specs, timeout=timeout)
    me = dist.get_rank()
    own: dict[tuple[int, int], dist.ProcessGroup] = {}
    for ranks in pipelines:
        if me not in ranks:
            continue
        for sender, receiver in pairs:
            name = channel(sender, receiver).on(ranks).name
            if name in groups:
                own[(sender, receiver)] = groups[name]
    return own
