"""Point-to-point messages of a lowered schedule, matched by order per (sender, receiver) pair.

A RECV action posts a non-blocking ``irecv`` into a buffer from ``make_buffer(action)``; the
consuming compute waits on it. A SEND action is an ``isend`` whose handle, and so its payload, is
kept until the send is known complete: when a message arrives that the peer sent after posting
the matching receive (``completions``, from ``schedules.lower.send_completions``), when the
backend reports it done (NCCL; gloo only after a wait; every completed send is freed, not only
the oldest), or at the latest in ``finish``. With ``expected`` (``MessageSpec``), a payload whose
shape or dtype differs from the receive buffer's is refused on the host before it is posted.
No tags are relied on (NCCL ignores them): ``lower`` already orders the receives from one peer as
that peer sends.

Every wait has a timeout whose error names the rank, the peer and the action, e.g.
``rank 2: timed out after 30 s waiting for RECV_F of stage 5 microbatch 3 from rank 1``.
``waits="blocking"`` (gloo) waits with ``work.wait(timeout)``. ``waits="watchdog"`` (NCCL) calls
plain ``work.wait()``, which only makes the compute stream wait, and leaves the deadline to a
``Watchdog``: on NCCL a wait with a timeout blocks the host until the GPU is done.

On NCCL, pass ``channels`` (``runtime.channels``): one group per direction of every pair, so a
send and a receive between two ranks run at once. Messages are posted one call
each, not grouped with ``batch_isend_irecv`` as megatron's p2p does: a batch must use one group
(both directions of a pair are two groups here), and torch runs a group's batched p2p on the
group's collective communicator but single p2p on a separate per-pair one, so mixing the two on
one group would leave two streams whose relative order NCCL does not keep.

``CUDA_DEVICE_MAX_CONNECTIONS``: Megatron-LM asserts 1 with tensor or context parallelism on
Hopper and earlier, so that every stream of a GPU feeds one FIFO hardware queue. The executor
launches operations in the lowered program's order, one global order cut into ranks
(``schedules.lower``), which ``nccl_rules`` replays under NCCL's and CUDA's rules, one queue
included, and finds deadlock free.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Literal, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as dist

from megatron_bitpipe.runtime.errors import P2PError, P2PTimeoutError, backend_reason
from megatron_bitpipe.runtime.watchdog import Watchdog
from megatron_bitpipe.schedules.ir import Action, Kind
from megatron_bitpipe.schedules.placement import Placement

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
Channels = Mapping[tuple[int, int], dist.ProcessGroup]
"""One process group per (sender, receiver) pipeline-rank pair."""
Waits = Literal["blocking", "watchdog"]


class MessageSpec(NamedTuple):
    """The shape and dtype of every receive buffer (both ends build them the same way)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Message:
    action: Action
    peer: int
    tensor: torch.Tensor
    work: dist.Work | None


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
        waits: ``"blocking"`` (the host waits, with the timeout) or ``"watchdog"`` (the host
            does not wait; ``watchdog`` enforces the timeout).
        watchdog: the Watchdog of ``waits="watchdog"`` (default: a new one).
        completions: RECV action -> this rank's SEND actions complete once it has arrived.
        expected: the shape and dtype of the peer's receive buffer; ``send`` refuses a payload
            that differs (NCCL does not check: a mismatch corrupts or hangs). Host metadata only.
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
        waits: Waits = "blocking",
        watchdog: Watchdog | None = None,
        completions: Mapping[Action, Sequence[Action]] | None = None,
        expected: MessageSpec | None = None,
    ) -> None:
        if waits not in ("blocking", "watchdog"):
            raise ValueError(f"waits must be 'blocking' or 'watchdog', got {waits!r}")
        self.placement = placement
        self.rank = rank
        self.make_buffer = make_buffer
        self.group = group
        self.channels = dict(channels or {})
        self.timeout_s = timeout_s
        self.waits = waits
        self.watchdog = None if waits == "blocking" else (watchdog or Watchdog())
        self.completions = completions or {}
        self.expected = None if expected is None else MessageSpec(tuple(expected[0]), expected[1])
        self.held_bytes = 0
        """Bytes of send payloads kept alive now (until each send is known complete)."""
        self.peak_held_bytes = 0
        self.waiting_for: str | None = None
        """What the host is waiting for right now (the Deadline names it), else None."""
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
        try:
            work = self._start_recv(buffer, peer)
        except RuntimeError as error:
            raise self._failure(action, peer, "from", error) from error
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
        for send in self.completions.get(action, ()):
            self.complete_send(send)
        return message.tensor

    def send(self, action: Action, tensor: torch.Tensor) -> None:
        """Start the non-blocking send of a SEND_F/SEND_B action; the handle is kept."""
        if action in self._sends:
            raise RuntimeError(f"rank {self.rank}: {action} sent twice")
        peer = self.peer_of(action)
        self._check_message(action, peer, tensor)
        payload = tensor.detach().contiguous()
        try:
            work = self._start_send(payload, peer)
        except RuntimeError as error:
            raise self._failure(action, peer, "to", error) from error
        self._sends[action] = _Message(action, peer, payload, work)
        self.held_bytes += payload.nbytes
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)

    def complete_send(self, action: Action) -> None:
        """Wait for a send started earlier, if it is still held (no-op otherwise)."""
        message = self._sends.pop(action, None)
        if message is not None:
            self._wait(message, "to")
            self.held_bytes -= message.tensor.nbytes

    def release_completed(self) -> None:
        """Drop every send known complete, wherever it is in sending order (NCCL reports
        completion; gloo only after a wait, so there this frees nothing and keeps them for
        ``finish``); with a watchdog, forget the waited works that completed; raise a missed
        deadline."""
        completed = [
            action
            for action, message in self._sends.items()
            if message.work is None or message.work.is_completed()
        ]
        for action in completed:
            self.complete_send(action)
        if self.watchdog is not None:
            self.watchdog.release_completed()
            self.watchdog.check()

    def finish(self) -> None:
        """Complete every held send, oldest first (call once the program has run)."""
        for action in list(self._sends):
            self.complete_send(action)

    def outstanding(self) -> list[str]:
        """Receives posted but never waited on, and sends not completed; empty when clean."""
        receives = [f"{m.action} from rank {m.peer}" for m in self._receives.values()]
        sends = [f"{m.action} to rank {m.peer}" for m in self._sends.values()]
        return receives + sends

    def _check_message(self, action: Action, peer: int, tensor: torch.Tensor) -> None:
        """Raise ``P2PError`` if ``tensor`` is not what the peer's receive buffer holds."""
        expected = self.expected
        if expected is None:
            return
        if tuple(tensor.shape) == expected.shape and tensor.dtype == expected.dtype:
            return
        raise P2PError(
            f"rank {self.rank}: {action} to rank {peer} sends shape {tuple(tensor.shape)} "
            f"{tensor.dtype}, but the receive buffer is {expected.shape} {expected.dtype}"
        )

    def _failure(self, action: Action, peer: int, preposition: str, error: Exception) -> P2PError:
        """The error of posting ``action``: names the rank, the message and the peer."""
        return P2PError(
            f"rank {self.rank}: posting {action.kind.value} of stage {action.stage} microbatch "
            f"{action.microbatch} {preposition} rank {peer} failed: {backend_reason(error)}"
        )

    def _start_send(self, payload: torch.Tensor, peer: int) -> dist.Work:
        return dist.isend(payload, dst=self._global_rank(peer), group=self._channel(self.rank, peer))

    def _start_recv(self, buffer: torch.Tensor, peer: int) -> dist.Work:
        return dist.irecv(buffer, src=self._global_rank(peer), group=self._channel(peer, self.rank))

    def _wait(self, message: _Message, preposition: str) -> None:
        if message.work is None:
            return
        action = message.action
        what = (
            f"{action.kind.value} of stage {action.stage} microbatch {action.microbatch} "
            f"{preposition} rank {message.peer}"
        )
        started = time.perf_counter()
        self.waiting_for = what
        try:
            if self.watchdog is None:
                message.work.wait(timedelta(seconds=self.timeout_s))
            else:
                self.watchdog.check()
                message.work.wait()
                self.watchdog.watch(
                    message.work,
                    self.timeout_s,
                    f"rank {self.rank}: timed out after {self.timeout_s:g} s waiting for {what}",
                )
        except RuntimeError as error:
            if isinstance(error, P2PTimeoutError):
                raise
            elapsed = time.perf_counter() - started
            text = str(error).lower()
            if "timed out" in text or "timeout" in text or elapsed >= self.timeout_s:
                failure: P2PError = P2PTimeoutError(
                    f"rank {self.rank}: timed out after {self.timeout_s:g} s waiting for {what}"
                )
            else:
                failure = P2PError(
                    f"rank {self.rank}: {what} failed after {elapsed:.1f} s: "
                    f"{backend_reason(error)}"
                )
            raise failure from error
        self.waiting_for = None
        message.work = None

    def _channel(self, sender: int, receiver: int) -> dist.ProcessGroup | None:
        return self.channels.get((sender, receiver), self.group)

    def _global_rank(self, pipeline_rank: int) -> int:
        if self.group is None:
            return pipeline_rank
        return dist.get_global_rank(self.group, pipeline_rank)
