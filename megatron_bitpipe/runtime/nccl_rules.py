"""Replay a step's communication under NCCL's and CUDA's rules, on the CPU, to prove it cannot hang.

Gloo connects a group inside ``new_group`` and buffers sends, so the CPU tests cannot see the
ways NCCL hangs. This module records, for every rank, the calls the real ``Executor`` and ``P2P``
make (``record_step``: the executor runs the rank's lowered program with a P2P whose transport
writes the calls down), then replays all ranks together (``replay``). It is no client of
``schedules.dataflow``: that engine runs actions that wait for facts earlier actions made, while
here an operation completes only together with its peers' (matching, lazy creation) and only
after everything ahead of it in a shared FIFO queue.

The rules replayed:

1. **Lazy, blocking creation.** A communicator is created at its first call; that call blocks
   the rank's host until every member has made its own first call on it.
2. **The host never waits otherwise** (the NCCL runtime's waits make the compute stream wait),
   except at a device-wide sync (``SYNC``: ``torch.cuda.synchronize``, ``empty_cache``, a value
   read on the host), which holds it until every operation it launched has completed.
3. **Streams run in order.** Every communicator has a stream per rank; a wait for an operation
   runs on the compute stream, and an NCCL operation first waits for the compute stream as it was
   at launch (torch's ProcessGroupNCCL does). An operation starts once the one before it on its
   stream, and whatever it waits for, has completed.
4. **Hardware queues are FIFO.** With ``CUDA_DEVICE_MAX_CONNECTIONS=1`` every stream of a GPU
   feeds one queue: an operation that cannot start blocks every operation launched after it, on
   every stream. With more connections, streams spread over that many queues.
5. **In-order matching per communicator, tags ignored; no eager sends.** A started send completes
   when the operation its peer has started on the same communicator is the matching receive
   (large messages wait for their receive); a collective completes once every member has started
   it.

A replay where no rank can move before all are done raises ``NcclDeadlock`` naming what every
stuck rank waits for; two matched operations that carry different messages raise ``NcclMismatch``
(on NCCL that is silent corruption).

The step as recorded: the executor's program (with the early send completions of
``schedules.lower.send_completions``, as the mcore adapter runs it), then the gradient reductions
the program started are waited on (megatron's ``finish_grad_sync``), then the loss all-reduce
over the pipeline group when the loss heads are not all on the last rank, then the optimizer's
host read of the gradient norm (a device-wide sync). ``setup_calls`` adds the set-up of
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

SEND, RECV, COLLECTIVE, WAIT, SYNC = "send", "recv", "collective", "wait", "sync"
COMPUTE_STREAM = "compute"


class HostCall(NamedTuple):
    """One call a rank makes: post an operation on a communicator, wait for one (on the compute
    stream), or sync the whole device (``SYNC``)."""

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

    def sync(self) -> None:
        self.calls.append(device_sync(self.during))


def device_sync(during: str) -> HostCall:
    """A device-wide sync made during ``during``: the host waits for all it launched."""
    return HostCall(SYNC, "", -1, None, "", during)


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


def record_step(
    lowered: Schedule,
    rank: int,
    *,
    channels: bool = True,
    completions: dict[Action, tuple[Action, ...]] | None = None,
) -> list[HostCall]:
    """The calls ``rank`` makes in one training step of ``lowered`` (see the module docstring);
    ``completions``: the rank's part of ``send_completions(lowered)`` (computed if None)."""
    placement = lowered.placement
    recorder = _Recorder()
    stages = _NullStages(placement, rank, recorder)
    if completions is None:
        completions = send_completions(lowered)[rank]
    p2p = _RecordingP2P(placement, rank, recorder, channels, completions)
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
    recorder.phase = "the optimizer step (the gradient norm read on the host)"
    recorder.sync()
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


def replay(
    programs: Sequence[Sequence[HostCall]],
    members: dict[str, tuple[int, ...]],
    *,
    connections: int | None = 1,
) -> None:
    """Run every rank's calls together under NCCL's and CUDA's rules (module docstring).

    ``connections`` is ``CUDA_DEVICE_MAX_CONNECTIONS``: 1 puts every stream of a GPU in one FIFO
    hardware queue; K > 1 spreads the streams over K queues in their order of first use; None
    gives every stream a queue of its own. Raises ``NcclDeadlock`` when no rank can move before
    all are done, ``NcclMismatch`` when two matched operations carry different messages.
    """
    if connections is not None and connections < 1:
        raise ValueError(f"connections must be >= 1 or None, got {connections}")
    gpus = [_Gpu(rank, calls, connections) for rank, calls in enumerate(programs)]
    world = _World(members, gpus)
    while world.changed:
        gpu = gpus[world.changed.popleft()]
        world.waiting.discard(gpu.rank)
        world.advance_host(gpu)
        world.dispatch(gpu)
    stuck = [gpu for gpu in gpus if not gpu.finished]
    if stuck:
        raise NcclDeadlock("; ".join(world.why_stuck(gpu) for gpu in stuck))


class _Op:
    """One operation launched on a GPU: a communicator call on its stream, or a compute-stream
    wait for an earlier operation (``awaited``)."""

    __slots__ = ("rank", "call", "stream", "before", "compute_before", "awaited", "state")

    LAUNCHED, RUNNING, COMPLETE = 0, 1, 2

    def __init__(self, rank: int, call: HostCall, stream: str, before: _Op | None) -> None:
        self.rank, self.call, self.stream = rank, call, stream
        self.before = before
        """The operation launched before it on the same stream (streams run in order)."""
        self.compute_before: _Op | None = None
        """The compute stream's last operation at launch: NCCL's stream waits for it."""
        self.awaited: _Op | None = None
        self.state = _Op.LAUNCHED

    def describe(self) -> str:
        call = self.call
        if call.kind == WAIT:
            return f"the compute stream's wait at {call.during}"
        return f"{call.kind} {call.payload!r} on {call.communicator} (posted at {call.during})"


class _Gpu:
    """A rank's host cursor and its GPU: streams, hardware queues, launched operations."""

    def __init__(self, rank: int, calls: Sequence[HostCall], connections: int | None) -> None:
        self.rank, self.calls, self.connections = rank, calls, connections
        self.cursor = 0
        self.ops: dict[int, _Op] = {}
        self.last_on: dict[str, _Op] = {}
        self.queues: dict[Any, deque[_Op]] = defaultdict(deque)
        self.queue_of: dict[str, Any] = {}
        self.incomplete = 0

    @property
    def finished(self) -> bool:
        return self.cursor == len(self.calls) and self.incomplete == 0

    def launch(self, call: HostCall) -> _Op:
        stream = COMPUTE_STREAM if call.kind == WAIT else call.communicator
        op = _Op(self.rank, call, stream, self.last_on.get(stream))
        if call.kind == WAIT:
            op.awaited = self.ops[call.handle]
        else:
            op.compute_before = self.last_on.get(COMPUTE_STREAM)
            self.ops[call.handle] = op
        self.last_on[stream] = op
        if stream not in self.queue_of:
            index = len(self.queue_of)
            self.queue_of[stream] = stream if self.connections is None else index % self.connections
        self.queues[self.queue_of[stream]].append(op)
        self.incomplete += 1
        return op


def _blocker(op: _Op) -> _Op | None:
    """The unfinished operation that keeps ``op`` from starting, or None if it can start."""
    for earlier in (op.before, op.compute_before, op.awaited):
        if earlier is not None and earlier.state != _Op.COMPLETE:
            return earlier
    return None


class _World:
    def __init__(self, members: dict[str, tuple[int, ...]], gpus: list[_Gpu]) -> None:
        self.members, self.gpus = members, gpus
        self.created: set[str] = set()
        self.arrived: dict[str, set[int]] = defaultdict(set)
        self.running: dict[tuple[str, int], _Op] = {}
        self.changed: deque[int] = deque(range(len(gpus)))
        """Ranks to look at again: something they may wait for has happened."""
        self.waiting: set[int] = set(self.changed)

    def touch(self, rank: int) -> None:
        if rank not in self.waiting:
            self.waiting.add(rank)
            self.changed.append(rank)

    def advance_host(self, gpu: _Gpu) -> bool:
        """Make ``gpu``'s host calls until one blocks (creation, a device-wide sync)."""
        start = gpu.cursor
        while gpu.cursor < len(gpu.calls):
            call = gpu.calls[gpu.cursor]
            if call.kind == SYNC:
                if gpu.incomplete:
                    break
            elif call.kind != WAIT and call.communicator not in self.created:
                name = call.communicator
                self.arrived[name].add(gpu.rank)
                if not self.arrived[name] >= set(self.members[name]):
                    break
                self.created.add(name)
                for member in self.members[name]:
                    self.touch(member)
            if call.kind != SYNC:
                gpu.launch(call)
            gpu.cursor += 1
        return gpu.cursor != start

    def dispatch(self, gpu: _Gpu) -> bool:
        """Start the operations at the heads of ``gpu``'s queues while they can start."""
        moved = False
        for queue in gpu.queues.values():
            while queue and _blocker(queue[0]) is None:
                self._start(queue.popleft())
                moved = True
        return moved

    def _start(self, op: _Op) -> None:
        if op.call.kind == WAIT:
            self._complete(op)
            return
        op.state = _Op.RUNNING
        name = op.call.communicator
        self.running[(name, op.rank)] = op
        if op.call.kind == COLLECTIVE:
            heads = [self.running.get((name, rank)) for rank in self.members[name]]
            if all(head is not None and head.call.kind == COLLECTIVE for head in heads):
                if len({head.call.payload for head in heads}) > 1:
                    running = "; ".join(
                        f"rank {head.rank} runs {head.call.payload} (during {head.call.during})"
                        for head in heads
                    )
                    raise NcclMismatch(f"{name}: the ranks' next collectives differ: {running}")
                for head in heads:
                    self._complete(head)
            return
        other = self.running.get((name, op.call.peer))
        if other is None or other.call.peer != op.rank or {op.call.kind, other.call.kind} != {SEND, RECV}:
            return
        send, receive = (op, other) if op.call.kind == SEND else (other, op)
        if send.call.payload != receive.call.payload:
            raise NcclMismatch(
                f"{name}: rank {send.rank} sends the {send.call.payload} (during "
                f"{send.call.during}) where rank {receive.rank} expects the "
                f"{receive.call.payload} (during {receive.call.during})"
            )
        self._complete(send)
        self._complete(receive)

    def _complete(self, op: _Op) -> None:
        op.state = _Op.COMPLETE
        self.gpus[op.rank].incomplete -= 1
        self.touch(op.rank)
        if op.call.kind != WAIT:
            del self.running[(op.call.communicator, op.rank)]

    def why_stuck(self, gpu: _Gpu) -> str:
        """What ``gpu``'s host waits for at a creation; else what its GPU cannot start; else what
        its device-wide sync waits for."""
        rank = gpu.rank
        call = gpu.calls[gpu.cursor] if gpu.cursor < len(gpu.calls) else None
        if call is not None and call.kind != SYNC:
            others = ", ".join(str(r) for r in self.members[call.communicator] if r != rank)
            return (
                f"rank {rank} waits at {call.during}: the first call on {call.communicator} "
                f"blocks until rank(s) {others} call on it too"
            )
        heads = [queue[0] for queue in gpu.queues.values() if queue]
        if heads:
            head = heads[0]
            blocker = _blocker(head)
            assert blocker is not None
            shared = self.gpus[rank].connections is not None and len(gpu.queues[gpu.queue_of[head.stream]]) > 1
            behind = " (one hardware queue: everything launched after it waits too)" if shared else ""
            return (
                f"rank {rank}'s GPU cannot start {head.describe()}: it waits for "
                f"{blocker.describe()}{self._unmatched(blocker)}{behind}"
            )
        pending = next(op for op in gpu.ops.values() if op.state != _Op.COMPLETE)
        where = f"rank {rank}'s {pending.describe()}" if call is None else (
            f"rank {rank} waits at {call.during}: a device-wide sync waits for {pending.describe()}"
        )
        return f"{where}{self._unmatched(pending) or ', which is never matched'}"

    def _unmatched(self, op: _Op) -> str:
        if op.state == _Op.RUNNING and op.call.peer is not None:
            return f", which rank {op.call.peer} has not matched"
        return ""


def first_step_calls(
    lowered: Schedule, *, initialize: bool, channels: bool = True
) -> list[list[HostCall]]:
    """Every rank's calls in the first step, with the set-up first when ``initialize``."""
    specs = step_communicators(lowered.placement)
    completions = send_completions(lowered)
    programs = []
    for rank in range(lowered.num_ranks):
        calls = setup_calls(specs, rank) if initialize else []
        offset = len(calls)
        step = record_step(lowered, rank, channels=channels, completions=completions[rank])
        calls += [call._replace(handle=call.handle + offset) for call in step]
        programs.append(calls)
    return programs


def check_first_step(
    lowered: Schedule,
    *,
    initialize: bool = True,
    channels: bool = True,
    connections: int | None = 1,
) -> None:
    """Replay the first step of ``lowered`` under NCCL's rules (``connections`` as in
    ``replay``); raise ``NcclDeadlock`` if it hangs, ``NcclMismatch`` if messages mix."""
    replay(
        first_step_calls(lowered, initialize=initialize, channels=channels),
        communicator_members(lowered.placement, channels=channels),
        connections=connections,
    )
