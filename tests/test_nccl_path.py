"""The smaller NCCL-path faults of issue 15 part 3, and the host-side message check, in-process.

A one-process gloo group stands in for real groups; NCCL-only calls are faked (this machine has
no GPU): they show what we ask torch for, not what NCCL does with it.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig

from megatron_bitpipe.mcore import communication, forward_backward
from megatron_bitpipe.mcore import groups as gradient_groups
from megatron_bitpipe.runtime import channels
from megatron_bitpipe.runtime.channels import CommunicatorSetupError, CommunicatorSpec
from megatron_bitpipe.runtime.clock import CudaEventClock, WallClock, default_clock
from megatron_bitpipe.runtime.errors import P2PError
from megatron_bitpipe.runtime.p2p import P2P, MessageSpec
from megatron_bitpipe.runtime.watchdog import Watchdog
from megatron_bitpipe.schedules import placement as placements
from megatron_bitpipe.schedules.ir import Action, Kind
from fake_works import FakeWork

WORLD_TIMEOUT = timedelta(minutes=3)


@pytest.fixture(scope="module")
def world():
    """A one-process gloo default group created with WORLD_TIMEOUT (or None if one existed)."""
    if dist.is_initialized():
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=WORLD_TIMEOUT
    )
    yield WORLD_TIMEOUT
    dist.destroy_process_group()


def timeout_of(group: dist.ProcessGroup) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


# 1. timeouts


def test_channel_groups_take_the_given_timeout(world):
    spec = CommunicatorSpec("channel test", (0,))
    created = channels.create_groups([spec], timeout=timedelta(seconds=42))
    assert timeout_of(created[spec.name]) == timedelta(seconds=42)
    dist.destroy_process_group(created[spec.name])


def test_channel_groups_default_to_the_default_groups_timeout(world):
    if world is None:
        pytest.skip("a default group with an unknown timeout already exists")
    spec = CommunicatorSpec("channel test", (0,))
    created = channels.create_groups([spec])
    assert timeout_of(created[spec.name]) == WORLD_TIMEOUT
    dist.destroy_process_group(created[spec.name])


def test_gradient_groups_of_two_replicas_take_the_given_timeout(monkeypatch):
    """D=2 bitpipe on two processes (faked): the replica-pair group gets the timeout."""
    data_parallel, pipeline = object(), object()
    made: list[dict] = []
    monkeypatch.setattr(parallel_state, "get_data_parallel_group", lambda **kw: data_parallel)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_group", lambda: pipeline)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(
        dist, "get_process_group_ranks", lambda g: [0, 1] if g is pipeline else [0]
    )
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)

    def gather(out: list, value: object, group: object = None) -> None:
        out[:] = [((0,), 1), ((1,), 0)]

    monkeypatch.setattr(dist, "all_gather_object", gather)

    def new_group(ranks: list[int], **kwargs: object) -> str:
        made.append({"ranks": ranks, **kwargs})
        return "group"

    monkeypatch.setattr(dist, "new_group", new_group)
    built = gradient_groups.create_gradient_groups(
        placements.bitpipe(2), timeout=timedelta(seconds=77)
    )
    assert built.ranks == (0, 1)
    assert made == [{"ranks": [0, 1], "timeout": timedelta(seconds=77)}]


# 2. stream pool


class FakeNCCLOptions:
    def __init__(self, is_high_priority_stream: bool = False) -> None:
        self.is_high_priority_stream = is_high_priority_stream
        self._timeout = timedelta(minutes=10)


def test_channel_groups_ask_nccl_for_high_priority_streams(monkeypatch):
    made: list[dict] = []
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(
        dist, "ProcessGroupNCCL", SimpleNamespace(Options=FakeNCCLOptions), raising=False
    )
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kwargs: made.append(kwargs))
    channels.create_groups([CommunicatorSpec("channel 0->1", (0, 1), 0)], timeout=timedelta(1))
    options = made[0]["pg_options"]
    assert options.is_high_priority_stream
    assert options._timeout == made[0]["timeout"] == timedelta(1)


def test_channel_groups_pass_no_options_off_nccl(world):
    assert channels.channel_options(timedelta(seconds=5)) is None


def test_stream_pool_check_refuses_a_rank_past_32_channels():
    with pytest.raises(CommunicatorSetupError) as caught:
        communication.check_stream_pool(placements.bitpipe(4), [8, 33, 8, 8])
    message = str(caught.value)
    assert "\n" not in message
    assert "rank 1 would hold 33 p2p channels" in message
    assert "32 high-priority CUDA streams" in message
    communication.check_stream_pool(placements.bitpipe(4), [32, 32, 8, 8])


@pytest.fixture
def fresh_state(monkeypatch):
    state = communication._Communication()
    monkeypatch.setattr(communication, "_STATE", state)
    return state


def test_setup_refuses_channels_past_the_pool_before_creating_groups(
    world, fresh_state, monkeypatch
):
    """30 channels still held from earlier schedules + 2 of looped(2) on a world of one."""
    pipeline = object()
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_group", lambda: pipeline)
    real_ranks = dist.get_process_group_ranks
    monkeypatch.setattr(
        dist, "get_process_group_ranks", lambda g: [0, 1] if g is pipeline else real_ranks(g)
    )

    def create_groups(*args: object, **kwargs: object) -> None:
        raise AssertionError("groups created although the pool is exceeded")

    monkeypatch.setattr(communication, "create_groups", create_groups)
    fresh_state.groups[("earlier",)] = [object()] * 31
    with pytest.raises(CommunicatorSetupError, match="rank 0 would hold 33 p2p channels"):
        communication.setup_communication(placements.looped(2))


def test_release_communication_destroys_every_channel_group(world, fresh_state):
    created = [dist.new_group([0]) for _ in range(3)]
    fresh_state.groups[("a",)] = created[:2]
    fresh_state.groups[("b",)] = created[2:]
    fresh_state.channels[("a",)] = {(0, 1): created[0]}
    fresh_state.initialized.update({("a",), ("b",)})
    communication.release_communication()
    live = dist.distributed_c10d._world.pg_map
    assert not any(group in live for group in created)
    assert communication.held_channels() == 0
    assert not fresh_state.channels and not fresh_state.initialized


# 3. sends freed out of order


def test_release_completed_frees_a_completed_send_behind_an_unfinished_one(works):
    watchdog = Watchdog(poll_s=60)
    p2p = P2P(
        placements.looped(2), 0, lambda a: torch.zeros(4), waits="watchdog", watchdog=watchdog
    )
    first, second = Action(0, Kind.SEND_F, 0), Action(0, Kind.SEND_F, 1)
    p2p.send(first, torch.ones(4))
    p2p.send(second, torch.ones(4))
    works[1].done = True
    p2p.release_completed()
    assert p2p.outstanding() == [f"{first} to rank 1"]
    assert p2p.held_bytes == torch.ones(4).nbytes
    watchdog.close()


# 4. watchdog device


def test_watchdog_thread_polls_on_the_device_current_when_it_started(monkeypatch):
    set_in: list[tuple[int, str]] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(
        torch.cuda,
        "set_device",
        lambda device: set_in.append((device, threading.current_thread().name)),
    )
    watchdog = Watchdog(poll_s=0.01)
    watchdog.watch(FakeWork(), 60, "never")
    deadline = time.monotonic() + 5
    while not set_in and time.monotonic() < deadline:
        time.sleep(0.01)
    watchdog.close()
    assert set_in == [(3, "bitpipe-watchdog")]


def test_watchdog_thread_touches_no_device_without_cuda(monkeypatch):
    set_in: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", set_in.append)
    watchdog = Watchdog(poll_s=0.01)
    watchdog.watch(FakeWork(), 60, "never")
    time.sleep(0.05)
    watchdog.close()
    assert set_in == []


# 5. gradient checks once, at finalize


class DeviceTensor(torch.Tensor):
    """Counts reads of its values by the host (on a GPU each would be a sync)."""

    reads = 0
    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.tolist}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:
            DeviceTensor.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def fake_chunk(values: list[list[float]], **checks: bool) -> SimpleNamespace:
    buckets = [
        SimpleNamespace(grad_data=torch.tensor(v).as_subclass(DeviceTensor)) for v in values
    ]
    return SimpleNamespace(
        ddp_config=DistributedDataParallelConfig(**checks),
        buffers=[SimpleNamespace(buckets=buckets)],
        expert_parallel_buffers=[],
    )


def test_gradient_checks_are_off_during_the_step_and_restored_after():
    chunk = fake_chunk([[1.0]], check_for_nan_in_grad=True)
    other = fake_chunk([[1.0]], check_for_large_grads=True)
    with forward_backward._grad_checks_deferred([chunk, other]) as checks:
        assert checks == (True, True)
        configs = [chunk.ddp_config, other.ddp_config]
        assert not any(c.check_for_nan_in_grad or c.check_for_large_grads for c in configs)
    assert chunk.ddp_config.check_for_nan_in_grad and other.ddp_config.check_for_large_grads
    assert not chunk.ddp_config.check_for_large_grads


def test_gradient_check_reads_the_device_once_for_every_bucket_of_every_chunk(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    chunks = [fake_chunk([[1.0, 2.0], [3.0]]), fake_chunk([[4.0], [5.0]])]
    DeviceTensor.reads = 0
    forward_backward.check_grads(chunks, True, True)
    assert DeviceTensor.reads == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_gradient_check_refuses_a_nan_or_inf_in_any_bucket(monkeypatch, bad):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    chunks = [fake_chunk([[1.0]]), fake_chunk([[2.0], [bad]])]
    with pytest.raises(RuntimeError, match="found (NaN|Inf) in the local grad norm"):
        forward_backward.check_grads(chunks, True, False)


# 6. CUDA events only when tracing


def test_cuda_event_clock_only_for_traced_steps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert isinstance(default_clock(), WallClock)
    assert isinstance(default_clock(trace=True), CudaEventClock)


def test_tracing_marks_only_the_steps_inside_it():
    assert not forward_backward._STATE.trace
    with forward_backward.tracing():
        assert forward_backward._STATE.trace
    assert not forward_backward._STATE.trace


# 7. message shape and dtype

EXPECTED = MessageSpec((2, 4), torch.float32)


@pytest.mark.parametrize(
    "payload, actual",
    [(torch.ones(2, 3), "(2, 3) torch.float32"), (torch.ones(2, 4).half(), "(2, 4) torch.float16")],
)
def test_send_refuses_a_payload_unlike_the_peers_buffer(works, payload, actual):
    p2p = P2P(placements.looped(2), 0, lambda a: torch.zeros(2, 4), expected=EXPECTED)
    with pytest.raises(P2PError) as caught:
        p2p.send(Action(0, Kind.SEND_F, 5), payload)
    assert str(caught.value) == (
        f"rank 0: 0SEND_F5 to rank 1 sends shape {actual}, but the receive buffer is "
        f"(2, 4) torch.float32"
    )
    assert works == []


def test_send_passes_a_payload_like_the_peers_buffer(works):
    p2p = P2P(placements.looped(2), 0, lambda a: torch.zeros(2, 4), expected=EXPECTED)
    p2p.send(Action(0, Kind.SEND_F, 5), torch.ones(2, 4))
    assert len(works) == 1


def test_step_p2p_expects_the_activation_shape_and_dtype(world, fresh_state, monkeypatch):
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_group", lambda: dist.group.WORLD)
    placement = placements.looped(2)
    fresh_state.channels[communication._key(placement)] = {}
    p2p = communication.p2p_for_step(placement, 0, (8, 2, 16), torch.bfloat16, {})
    assert p2p.expected == MessageSpec((8, 2, 16), torch.bfloat16)
