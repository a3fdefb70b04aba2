"""The runtime's measuring tools: host-sync audit, peak memory, trace clock, output release."""

from __future__ import annotations

import sys

import torch

from megatron_bitpipe.runtime import Executor
from megatron_bitpipe.runtime.clock import WallClock
from megatron_bitpipe.runtime.host_syncs import HostSyncAudit
from megatron_bitpipe.runtime.memory import PeakMemory
from megatron_bitpipe.schedules import placement as placements
from megatron_bitpipe.schedules.ir import Action, Kind
from megatron_bitpipe.schedules.lower import lower
from schedule_fixtures import one_f_one_b


def test_audit_counts_value_reads_blocking_copies_and_waits():
    tensor = torch.ones(3)
    with HostSyncAudit() as audit:
        item_line = sys._getframe().f_lineno + 1
        tensor[0].item()
        if tensor.sum():
            pass
        float(tensor[1])
        tensor.to("cpu")  # a copy with a target device and no non_blocking
        tensor.nonzero()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    assert {name: count for name, (count, _) in audit.calls.items()} == {
        "Tensor.item": 1,
        "Tensor.__bool__": 1,
        "Tensor.__float__": 1,
        "Tensor.to": 1,
        "Tensor.nonzero": 1,
    }
    assert audit.calls["Tensor.item"][1] == f"{__file__}:{item_line}"


def test_audit_leaves_device_side_work_alone():
    tensor = torch.ones(3)
    with HostSyncAudit() as audit:
        total = torch.zeros([], dtype=torch.int)
        total += torch.tensor(4, dtype=torch.int)  # megatron's num_tokens accumulation
        tensor.to("cpu", non_blocking=True)
        tensor.to(torch.float64)
        (tensor * 2).sum()
    assert audit.total == 0, audit.report()


def test_audit_flags_a_per_forward_token_count_copy():
    """The copy megatron_bitpipe made on every forward before (47 ms each on an H200)."""
    total = torch.zeros([], dtype=torch.int)
    with HostSyncAudit() as audit:
        for _ in range(3):
            total += torch.tensor(4, dtype=torch.int).to(total.device)
    assert audit.calls["Tensor.to"][0] == 3


def test_audit_restores_everything_it_patched():
    before = (torch.Tensor.item, torch.Tensor.to, torch.nonzero)
    with HostSyncAudit():
        assert torch.Tensor.item is not before[0]
    assert (torch.Tensor.item, torch.Tensor.to, torch.nonzero) == before
    assert "__bool__" not in vars(torch.Tensor)


def test_peak_memory_counts_the_bytes_a_block_held_at_once():
    megabyte = 1 << 20
    with PeakMemory(torch.device("cpu")) as peak:
        held = [torch.empty(megabyte, dtype=torch.uint8) for _ in range(3)]
        del held
        torch.empty(2 * megabyte, dtype=torch.uint8)
    assert 3 * megabyte <= peak.bytes < 3 * megabyte + 4096


class Stages:
    """Tiny linear stages; records what the executor released and when."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.events: list[str] = []

    def forward(self, stage, microbatch, input_tensor):
        source = torch.ones(8, requires_grad=True) if input_tensor is None else input_tensor
        return source * 2

    def release_output(self, stage, microbatch, output_tensor):
        self.events.append(f"release {stage}F{microbatch}")

    def backward(self, stage, microbatch, input_tensor, output_tensor, output_grad):
        return None if input_tensor is None else torch.ones(8)

    def reduce_grad(self, stage):
        return None


class RecordingP2P:
    """Just enough P2P for one rank that only sends activations."""

    def __init__(self, stages: Stages) -> None:
        self.stages = stages

    def send(self, action, tensor):
        self.stages.events.append(f"send {action}")

    def post_recv(self, action):
        self.stages.events.append(f"post {action}")

    def wait_recv(self, action):
        return torch.ones(8)

    def complete_send(self, action):
        return None

    def release_completed(self):
        return None

    def finish(self):
        return None

    def outstanding(self):
        return []


def test_an_output_is_released_right_after_its_send_not_at_its_backward():
    schedule = lower(one_f_one_b(2, 2))
    stages = Stages(0)
    executor = Executor(schedule.placement, 0, stages, RecordingP2P(stages))
    executor.run(schedule.programs[0])
    assert stages.events == [
        "send 0SEND_F0",
        "release 0F0",
        "send 0SEND_F1",
        "release 0F1",
        "post 0RECV_B0",
        "post 0RECV_B1",
    ]


def test_trace_marks_every_action_with_its_clock():
    class CountingClock(WallClock):
        def __init__(self) -> None:
            self.marks = 0

        def mark(self) -> float:
            self.marks += 1
            return float(self.marks)

    clock = CountingClock()
    layout = placements.looped(1)
    stages = Stages(0)
    executor = Executor(layout, 0, stages, clock=clock)
    program = (Action(0, Kind.F, 0), Action(0, Kind.B, 0))
    executor.run(program)
    assert [(str(e.action), e.start, e.end) for e in executor.trace] == [("0F0", 1.0, 2.0), ("0B0", 3.0, 4.0)]
