"""Replay a step's communication under NCCL's rules, on the CPU, to prove it cannot hang.

Gloo connects a group inside ``new_group`` and buffers sends, so the CPU tests cannot see the
ways NCCL hangs. This module records, for every rank, the calls the real ``Executor`` and ``P2P``
make (``record_step``: the executor runs the rank's lowered program with a P2P whose transport
writes the calls down), then replays all ranks together under NCCL's rules (``replay``):

1. **Lazy, blocking creation.** A communicator is created at its first call; that call blocks
   the rank until every member has made its own first call on it.
2. **In-order matching per communicator, tags ignored.** A rank's operations on one
   communicator run in posting order; the operation at the head matches the peer's operation at
   the head (a send with a receive, a collective with the same collective on every member),
   whatever tensor each carries. Until it is matched it holds back everything behind it.
   A send is complete once matched (rendezvous: no eager buffering is assumed).
3. **Waiting blocks.** ``wait`` on an operation holds the rank until the operation is matched
   (on NCCL the compute stream waits; everything after it on the rank runs later).

Posting never blocks, apart from creation. A replay where no rank can move before all are done
raises ``NcclDeadlock`` naming what every stuck rank waits for; a send matched with a receive
that expects another message raises ``NcclMismatch`` (on NCCL that is silent corruption).

The step as recorded: the executor's program (with the early send completions of
``schedules.lower.send_completions``, as the mcore adapter runs it), then the gradient reductions
the program started are waited on (megatron's ``finish_grad_sync``), then the loss all-reduce
over the pipeline group when the loss heads are not all on the last rank. ``setup_calls`` adds the set-up of
``runtime.channels.initialize_communicators`` in front, in the order it really uses.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any, NamedTuple, Sequence

import torch

from megatron_bitpipe.runtime.channels import (
    CommunicatorSpec,
    initialization_order,
    step_communicators,
)
from megatron_bitpipe.runtime.executor import Executor
from megatron_bitpipe.runtime.p2p import P2P
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule
from megatron_bitpipe.schedules.lower import send_completions
from megatron_bitpipe.schedules.placement import Placement

SEND, RECV, COLLECTIVE, WAIT = "send", "recv", "collective", "wait"


class HostCall(NamedTuple):
    """One call a rank makes: post an operation on a communicator, or wait for one."""

    kind: str
    communicator: str
    handle: int
    peer: int | None
    payload: str
    """What the operation carries (a message, or which reduction); matching compares it."""
    during: str
    """The executor action, or set-up step, that made the call."""


class NcclDeadlock(RuntimeError):
    """No rank can move; the text names what each stuck rank waits for."""


class NcclMismatch(RuntimeError):
    """Two matched operations carry different messages."""


class _Recorder:
    """Writes calls down, labelled with the executor's current action or else ``phase``."""

    def __init__(self) -> None:
        self.calls: list[HostCall] = []
        self.phase = "set-up"
        self.executor: Executor | None = None

    @property
    def during(self) -> str:
        action = None if self.executor is None else self.executor.current_action
        return self.phase if action is None else str(action)

    def post(self, kind: str, communicator: str, peer: int | None, payload: str) -> _RecordedWork:
        handle = len(self.calls)
        self.calls.append(HostCall(kind, communicator, handle, peer, payload, self.during))
        return _RecordedWork(self, handle, communicator)

    def wait(self, handle: int, communicator: str) -> None:
        self.calls.append(HostCall(WAIT, communicator, handle, None, "", self.during))


class _RecordedWork:
    """A ``dist.Work`` stand-in: waits are written down, nothing ever completes early."""

    def __init__(self, recorder: _Recorder, handle: int, communicator: str) -> None:
        self.recorder, self.handle, self.communicator = recorder, handle, communicator

    def wait(self, timeout: Any = None) -> bool:
        self.recorder.wait(self.handle, self.communicator)
        return True

    def is_completed(self) -> bool:
        return False


def _message(placement: Placement, action: Action) -> str:
    """The message a SEND/RECV action moves, named by its producer (the same on both ends)."""
    stage, microbatch = action.stage, action.microbatch
    if action.kind is Kind.SEND_F:
        return f"activation of stage {stage} microbatch {microbatch}"
    if action.kind is Kind.RECV_F:
        return f"activation of stage {placement.prev_stage(stage)} microbatch {microbatch}"
    if action.kind is Kind.SEND_B:
        return f"gradient of stage {stage} microbatch {microbatch}"
    return f"gradient of stage {placement.next_stage(stage)} microbatch {microbatch}"


def p2p_communicator(sender: int, receiver: int, channels: bool) -> str:
    """The NCCL communicator a message uses: its channel, or the pipeline group's pair comm."""
    if channels:
        return f"channel {sender}->{receiver}"
    low, high = sorted((sender, receiver))
    return f"pipeline pair {low}:{high}"


class _RecordingP2P(P2P):
    def __init__(
        self,
        placement: Placement,
        rank: int,
        recorder: _Recorder,
        channels: bool,
        completions: dict[Action, tuple[Action, ...]],
    ):
        super().__init__(
            placement,
            rank,
            lambda action: torch.zeros(1),
            waits="blocking",
            completions=completions,
        )
        self.recorder = recorder
        self.use_channels = channels
        self._posting: Action | None = None

    def post_recv(self, action: Action) -> None:
        self._posting = action
        super().post_recv(action)

    def send(self, action: Action, tensor: torch.Tensor) -> None:
        self._posting = action
        super().send(action, tensor)

    def _start_send(self, payload: torch.Tensor, peer: int) -> Any:
        assert self._posting is not None
        name = p2p_communicator(self.rank, peer, self.use_channels)
        return self.recorder.post(SEND, name, peer, _message(self.placement, self._posting))

    def _start_recv(self, buffer: torch.Tensor, peer: int) -> Any:
        assert self._posting is not None
        name = p2p_communicator(peer, self.rank, self.use_channels)
        return self.recorder.post(RECV, name, peer, _message(self.placement, self._posting))


class _NullStages:
    """StageCallbacks that compute nothing; ``reduce_grad`` posts the gradient all-reduce."""

    def __init__(self, placement: Placement, rank: int, recorder: _Recorder) -> None:
        self.placement = placement
        self.rank = rank
        self.recorder = recorder
        self.reductions: list[_RecordedWork] = []

    def forward(self, stage: int, microbatch: int, input_tensor: Any) -> torch.Tensor:
        return torch.zeros(1)

    def release_output(self, stage: int, microbatch: int, output_tensor: torch.Tensor) -> None:
        return None

    def backward(self, stage: int, microbatch: int, input_tensor: Any, *rest: Any) -> Any:
        return None if input_tensor is None else torch.zeros(1)

    backward_input = backward

    def backward_weight(self, *args: Any) -> None:
        return None

    def reduce_grad(self, stage: int) -> None:
        position = self.placement.position(stage)
        work = self.recorder.post(
            COLLECTIVE,
            gradient_communicator(self.placement, self.rank),
            None,
            f"gradients of stage position {position}",
        )
        self.reductions.append(work)


def gradient_communicator(placement: Placement, rank: int) -> str:
    """The group that reduces ``rank``'s gradients: its replica pair, or itself (DP = 1)."""
    if placement.num_pipelines == 2:
        low, high = sorted((rank, placement.num_ranks - 1 - rank))
        return f"replicas {low},{high}"
    return f"data-parallel {rank}"


def record_step(lowered: Schedule, rank: int, *, channels: bool = True) -> list[HostCall]:
    """The calls ``rank`` makes in one training step of ``lowered`` (see the module docstring)."""
    placement = lowered.placement
    recorder = _Recorder()
    stages = _NullStages(placement, rank, recorder)
    p2p = _RecordingP2P(placement, rank, recorder, channels, send_completions(lowered)[rank])
    executor = Executor(placement, rank, stages, p2p)
    recorder.executor = executor
    recorder.phase = "the end of the program"
    executor.run(lowered.programs[rank])
    recorder.phase = "finalize (gradient reductions)"
    for work in stages.reductions:
        work.wait()
    if placement.loss_ranks() != {placement.num_ranks - 1}:
        recorder.phase = "the loss all-reduce"
        everyone = ",".join(map(str, range(placement.num_ranks)))
        recorder.post(COLLECTIVE, f"pipeline {everyone}", None, "losses").wait()
    return recorder.calls


def setup_calls(specs: Sequence[CommunicatorSpec], rank: int) -> list[HostCall]:
    """The calls of ``initialize_communicators`` on ``rank``, in the order it makes them."""
    recorder = _Recorder()
    for spec in initialization_order(specs, rank):
        recorder.phase = f"set-up of {spec.name}"
        if spec.sender is None:
            work = recorder.post(COLLECTIVE, spec.name, None, "set-up")
        elif spec.sender == rank:
            work = recorder.post(SEND, spec.name, spec.receiver, "set-up")
        else:
            work = recorder.post(RECV, spec.name, spec.sender, "set-up")
        work.wait()
    return recorder.calls


def communicator_members(placement: Placement, *, channels: bool = True) -> dict[str, tuple[int, ...]]:
    """Every communicator a step can call on, with its members (pipeline ranks)."""
    members = {spec.name: spec.ranks for spec in step_communicators(placement)}
    if placement.num_pipelines == 1:
        members.update({gradient_communicator(placement, r): (r,) for r in range(placement.num_ranks)})
    if not channels:
        for low in range(placement.num_ranks):
            for high in range(low + 1, placement.num_ranks):
                members[p2p_communicator(low, high, False)] = (low, high)
    return members


def replay(programs: Sequence[Sequence[HostCall]], members: dict[str, tuple[int, ...]]) -> None:
    """Run every rank's calls together under NCCL's rules; raise on a deadlock or a mismatch."""
    num_ranks = len(programs)
    cursor = [0] * num_ranks
    created: set[str] = set()
    arrived: dict[str, set[int]] = defaultdict(set)
    queues: dict[tuple[str, int], deque[HostCall]] = defaultdict(deque)
    completed: set[tuple[int, int]] = set()
    progress = True
    while progress:
        progress = False
        for rank in range(num_ranks):
            calls = programs[rank]
            while cursor[rank] < len(calls):
                call = calls[cursor[rank]]
                if call.kind == WAIT:
                    if (rank, call.handle) not in completed:
                        break
                else:
                    name = call.communicator
                    if name not in created:
                        arrived[name].add(rank)
                        if not arrived[name] >= set(members[name]):
                            break
                        created.add(name)
                    queues[(name, rank)].append(call)
                    _match(name, members[name], queues, completed)
                cursor[rank] += 1
                progress = True
    stuck = [rank for rank in range(num_ranks) if cursor[rank] < len(programs[rank])]
    if stuck:
        reasons = [_why_stuck(rank, programs[rank][cursor[rank]], members, created) for rank in stuck]
        raise NcclDeadlock("; ".join(reasons))


def _match(
    name: str,
    ranks: tuple[int, ...],
    queues: dict[tuple[str, int], deque[HostCall]],
    completed: set[tuple[int, int]],
) -> None:
    """Complete operations at the heads of ``name``'s queues while they match."""
    while True:
        heads = {rank: queues[(name, rank)][0] for rank in ranks if queues[(name, rank)]}
        pair = _matching_pair(heads)
        if pair is not None:
            sender, receiver = pair
            send, receive = queues[(name, sender)].popleft(), queues[(name, receiver)].popleft()
            if send.payload != receive.payload:
                raise NcclMismatch(
                    f"{name}: rank {sender} sends the {send.payload} (during {send.during}) where "
                    f"rank {receiver} expects the {receive.payload} (during {receive.during})"
                )
            completed.update({(sender, send.handle), (receiver, receive.handle)})
        elif len(heads) == len(ranks) and all(head.kind == COLLECTIVE for head in heads.values()):
            if len({head.payload for head in heads.values()}) > 1:
                running = "; ".join(
                    f"rank {rank} runs {head.payload} (during {head.during})"
                    for rank, head in heads.items()
                )
                raise NcclMismatch(f"{name}: the ranks' next collectives differ: {running}")
            completed.update((rank, queues[(name, rank)].popleft().handle) for rank in ranks)
        else:
            return


def _matching_pair(heads: dict[int, HostCall]) -> tuple[int, int] | None:
    for rank, head in heads.items():
        if head.kind == SEND:
            other = heads.get(head.peer)
            if other is not None and other.kind == RECV and other.peer == rank:
                return rank, head.peer
    return None


def _why_stuck(
    rank: int, call: HostCall, members: dict[str, tuple[int, ...]], created: set[str]
) -> str:
    where = f"rank {rank} waits at {call.during}"
    if call.kind == WAIT:
        return f"{where} for its {call.communicator} operation to be matched"
    if call.communicator not in created:
        others = ", ".join(str(r) for r in members[call.communicator] if r != rank)
        return (
            f"{where}: the first call on {call.communicator} blocks until rank(s) {others} "
            f"call on it too"
        )
    return f"{where} on {call.communicator}"  # pragma: no cover - posting only blocks at creation


def first_step_calls(
    lowered: Schedule, *, initialize: bool, channels: bool = True
) -> list[list[HostCall]]:
    """Every rank's calls in the first step, with the set-up first when ``initialize``."""
    specs = step_communicators(lowered.placement)
    programs = []
    for rank in range(lowered.num_ranks):
        calls = setup_calls(specs, rank) if initialize else []
        offset = len(calls)
        step = record_step(lowered, rank, channels=channels)
        calls += [call._replace(handle=call.handle + offset) for call in step]
        programs.append(calls)
    return programs


def check_first_step(lowered: Schedule, *, initialize: bool = True, channels: bool = True) -> None:
    """Replay the first step of ``lowered`` under NCCL's rules; raise if it hangs or mismatches."""
    replay(
        first_step_calls(lowered, initialize=initialize, channels=channels),
        communicator_members(lowered.placement, channels=channels),
    )
