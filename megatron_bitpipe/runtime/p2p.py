"""Point-to-point messages of a lowered schedule, matched by order per (sender, receiver) pair.

A RECV action posts a non-blocking ``irecv`` into a buffer from ``make_buffer(action)``; the
consuming compute waits on it. A SEND action is an ``isend`` whose handle is kept and completed
later: a SEND_F when its own stage's backward runs (the gradient coming back proves the
activation arrived), everything else in ``finish``. No tags are relied on (NCCL ignores them):
``lower`` already orders the receives from one peer as that peer sends.

Every wait has a timeout whose error names the rank, the peer and the action, e.g.
``rank 2: timed out after 30 s waiting for RECV_F of stage 5 microbatch 3 from rank 1``.

On NCCL, messages in both directions over one communicator share one stream and can block each
other; pass ``channels=build_channels(...)`` so every direction of every pair has its own group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from megatron_bitpipe.schedules.ir import Action, Kind
from megatron_bitpipe.schedules.placement import Placement

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
Channels = Mapping[tuple[int, int], dist.ProcessGroup]
"""One process group per (sender, receiver) pipeline-rank pair."""


class P2PError(RuntimeError):
    """A message failed; the text names the rank, the peer and the action."""


class P2PTimeoutError(P2PError):
    """A message did not arrive (or leave) within the timeout."""


@dataclass
class _Message:
    action: Action
    peer: int
    tensor: torch.Tensor
    work: dist.Work | None


def message_pairs(placement: Placement) -> list[tuple[int, int]]:
    """Every (sender, receiver) pair that a schedule on ``placement`` can use, both directions."""
    pairs = set()
    for stage in range(placement.num_stages):
        following = placement.next_stage(stage)
        if following is not None and placement.rank_of(following) != placement.rank_of(stage):
            sender, receiver = placement.rank_of(stage), placement.rank_of(following)
            pairs.update({(sender, receiver), (receiver, sender)})
    return sorted(pairs)


def build_channels(
    pairs: Iterable[tuple[int, int]], pipelines: list[list[int]] | None = None
) -> dict[tuple[int, int], dist.ProcessGroup]:
    """Create one group per ordered pair, for every pipeline; return the calling rank's.

    Collective: every process of the default group calls it with the same arguments.
    ``pipelines`` lists the global ranks of each pipeline-parallel group (default: one pipeline,
    the whole world, pipeline rank = global rank).
    """
    if pipelines is None:
        pipelines = [list(range(dist.get_world_size()))]
    me = dist.get_rank()
    own: dict[tuple[int, int], dist.ProcessGroup] = {}
    for ranks in pipelines:
        for sender, receiver in sorted(set(pairs)):
            group = dist.new_group([ranks[sender], ranks[receiver]])
            if me in (ranks[sender], ranks[receiver]):
                own[(sender, receiver)] = group
    logger.debug("rank %d: %d p2p channels", me, len(own))
    return own


class P2P:
    """Sends and receives of one pipeline rank, keyed by their SEND_*/RECV_* actions.

    Args:
        placement: where every stage lives (gives each action's peer).
        rank: this process's pipeline rank.
        make_buffer: ``make_buffer(recv_action) -> empty tensor`` of the shape, dtype and device
            the message has (the caller knows seq x micro-batch x hidden).
        group: the pipeline-parallel group (None: the default group, pipeline rank = global rank).
        channels: optional group per (sender, receiver) pair; pairs not in it use ``group``.
        timeout_s: the longest any single wait may take.
    """

    def __init__(
        self,
        placement: Placement,
        rank: int,
        make_buffer: Callable[[Action], torch.Tensor],
        *,
        group: dist.ProcessGroup | None = None,
        channels: Channels | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.placement = placement
        self.rank = rank
        self.make_buffer = make_buffer
        self.group = group
        self.channels = dict(channels or {})
        self.timeout_s = timeout_s
        self._receives: dict[Action, _Message] = {}
        self._sends: dict[Action, _Message] = {}

    def peer_of(self, action: Action) -> int:
        """The other rank of a SEND_*/RECV_* action; ValueError if the action crosses no rank."""
        placement = self.placement
        if action.kind in (Kind.SEND_F, Kind.RECV_B):
            neighbour = placement.next_stage(action.stage)
        elif action.kind in (Kind.SEND_B, Kind.RECV_F):
            neighbour = placement.prev_stage(action.stage)
        else:
            raise ValueError(f"rank {self.rank}: {action} is not a communication action")
        if neighbour is None or placement.rank_of(neighbour) == self.rank:
            raise ValueError(
                f"rank {self.rank}: {action} crosses no rank boundary; no message to move"
            )
        return placement.rank_of(neighbour)

    def post_recv(self, action: Action) -> None:
        """Post the non-blocking receive of a RECV_F/RECV_B action."""
        if action in self._receives:
            raise RuntimeError(f"rank {self.rank}: {action} posted twice")
        peer = self.peer_of(action)
        buffer = self.make_buffer(action)
        work = dist.irecv(buffer, src=self._global_rank(peer), group=self._channel(peer, self.rank))
        self._receives[action] = _Message(action, peer, buffer, work)

    def wait_recv(self, action: Action) -> torch.Tensor:
        """Wait (with timeout) for a posted receive; return its buffer."""
        message = self._receives.pop(action, None)
        if message is None:
            raise RuntimeError(
                f"rank {self.rank}: {action} was never posted; is the schedule lowered and is the "
                f"RECV before its consumer?"
            )
        self._wait(message, "from")
        return message.tensor

    def send(self, action: Action, tensor: torch.Tensor) -> None:
        """Start the non-blocking send of a SEND_F/SEND_B action; the handle is kept."""
        if action in self._sends:
            raise RuntimeError(f"rank {self.rank}: {action} sent twice")
        peer = self.peer_of(action)
        payload = tensor.detach().contiguous()
        work = dist.isend(
            payload, dst=self._global_rank(peer), group=self._channel(self.rank, peer)
        )
        self._sends[action] = _Message(action, peer, payload, work)

    def complete_send(self, action: Action) -> None:
        """Wait for a send started earlier, if it is still held (no-op otherwise)."""
        message = self._sends.pop(action, None)
        if message is not None:
            self._wait(message, "to")

    def release_completed(self) -> None:
        """Drop the oldest sends while they are known complete (NCCL reports completion; gloo
        only after a wait, so there this waits for nothing and keeps them for ``finish``)."""
        for action, message in list(self._sends.items()):
            if message.work is not None and not message.work.is_completed():
                return
            self.complete_send(action)

    def finish(self) -> None:
        """Complete every held send, oldest first (call once the program has run)."""
        for action in list(self._sends):
            self.complete_send(action)

    def outstanding(self) -> list[str]:
        """Receives posted but never waited on, and sends not completed; empty when clean."""
        receives = [f"{m.action} from rank {m.peer}" for m in self._receives.values()]
        sends = [f"{m.action} to rank {m.peer}" for m in self._sends.values()]
        return receives + sends

    def _wait(self, message: _Message, preposition: str) -> None:
        if message.work is None:
            return
        started = time.perf_counter()
        try:
            message.work.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as error:
            elapsed = time.perf_counter() - started
            action = message.action
            what = (
                f"{action.kind.value} of stage {action.stage} microbatch {action.microbatch} "
                f"{preposition} rank {message.peer}"
            )
            text = str(error).lower()
            if "timed out" in text or "timeout" in text or elapsed >= self.timeout_s:
                failure: P2PError = P2PTimeoutError(
                    f"rank {self.rank}: timed out after {self.timeout_s:g} s waiting for {what}"
                )
            else:
                failure = P2PError(
                    f"rank {self.rank}: {what} failed after {elapsed:.1f} s: {error}"
                )
            logger.error("%s", failure)
            raise failure from error
        message.work = None

    def _channel(self, sender: int, receiver: int) -> dist.ProcessGroup | None:
        return self.channels.get((sender, receiver), self.group)

    def _global_rank(self, pipeline_rank: int) -> int:
        if self.group is None:
            return pipeline_rank
        return dist.get_global_rank(self.group, pipeline_rank)
