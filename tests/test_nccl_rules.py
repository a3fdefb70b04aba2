"""NCCL's rules, replayed on the CPU: the first step of every schedule cannot hang on GPUs.

``runtime.nccl_rules`` records the calls the real executor and P2P make on each rank and replays
them together under NCCL's and CUDA's rules (lazy blocking creation per communicator, in-order
matching per communicator, tags ignored, rendezvous sends, streams in order, one FIFO hardware
queue per GPU with ``CUDA_DEVICE_MAX_CONNECTIONS=1``, device-wide syncs). Gloo connects groups
inside ``new_group`` and buffers sends, so the multi-process CPU tests cannot see these hangs;
these tests are what argues the GPU path. ``receives_posted_at_use`` rebuilds the receive order
of the lowering before its global order, to show that each rule catches what it should.
"""

from __future__ import annotations

import itertools
import random

import pytest

from megatron_bitpipe.runtime import nccl_rules
from megatron_bitpipe.runtime.channels import CommunicatorSpec, initialization_order, step_communicators
from megatron_bitpipe.runtime.nccl_rules import NcclDeadlock, NcclMismatch
from megatron_bitpipe.schedules import ScheduleConfigError, build, lower, names
from megatron_bitpipe.schedules.ir import Schedule
from schedule_fixtures import receives_posted_at_use

OPTIONS = {"interleaved-1f1b": {"vp": 2}, "breadth-first": {"vp": 2}}
BIDIRECTIONAL = ("bitpipe", "bitpipe-official", "chimera")


def lowered(name: str, num_ranks: int, num_microbatches: int):
    return lower(build(name, num_ranks, num_microbatches, **OPTIONS.get(name, {})), grad_sync=True)


def _cases() -> list[tuple[str, int, int]]:
    """Every registry schedule at D = 2, 4, 8 and N = D, 2D, 4D where its rules allow N."""
    cases = []
    for name, num_ranks, factor in itertools.product(names(), (2, 4, 8), (1, 2, 4)):
        try:
            build(name, num_ranks, factor * num_ranks, **OPTIONS.get(name, {}))
        except ScheduleConfigError:
            continue
        cases.append((name, num_ranks, factor * num_ranks))
    return cases


def replay_with_syncs(schedule: Schedule, syncs: dict[int, list[int]], connections: int | None) -> None:
    """Replay the first step with a device-wide sync before call ``i`` of rank ``r`` for every
    ``i`` in ``syncs[r]``."""
    programs = [list(calls) for calls in nccl_rules.first_step_calls(schedule, initialize=True)]
    for rank, positions in syncs.items():
        for position in sorted(positions, reverse=True):
            programs[rank].insert(position, nccl_rules.device_sync(f"sync {position} of rank {rank}"))
    nccl_rules.replay(programs, nccl_rules.communicator_members(schedule.placement), connections=connections)


QUEUES = pytest.mark.parametrize("connections", [1, None], ids=["one-hardware-queue", "queue-per-stream"])


@QUEUES
@pytest.mark.parametrize("name,num_ranks,num_microbatches", _cases())
def test_first_step_cannot_hang_under_nccl_and_cuda_queue_rules(name, num_ranks, num_microbatches, connections):
    nccl_rules.check_first_step(lowered(name, num_ranks, num_microbatches), connections=connections)


@pytest.mark.parametrize("name,num_ranks,num_microbatches", _cases())
def test_first_step_cannot_hang_even_with_communicators_created_at_first_use(name, num_ranks, num_microbatches):
    nccl_rules.check_first_step(lowered(name, num_ranks, num_microbatches), initialize=False)


@pytest.mark.parametrize("name,num_ranks,num_microbatches", _cases())
def test_device_wide_syncs_anywhere_in_the_step_cannot_hang(name, num_ranks, num_microbatches):
    schedule = lowered(name, num_ranks, num_microbatches)
    lengths = [len(calls) for calls in nccl_rules.first_step_calls(schedule, initialize=True)]
    generator = random.Random(f"{name} {num_ranks} {num_microbatches}")
    for _ in range(4):
        syncs = {rank: generator.sample(range(length + 1), 3) for rank, length in enumerate(lengths)}
        replay_with_syncs(schedule, syncs, connections=1)


def test_a_device_wide_sync_on_each_of_two_ranks_anywhere_cannot_hang_bitpipe():
    schedule = lowered("bitpipe", 2, 4)
    first, second = (len(calls) for calls in nccl_rules.first_step_calls(schedule, initialize=True))
    for position_0, position_1 in itertools.product(range(first + 1), range(second + 1)):
        replay_with_syncs(schedule, {0: [position_0], 1: [position_1]}, connections=1)


def test_receives_posted_at_use_hang_sixteen_registry_cases_with_one_hardware_queue():
    """What the one-queue rule catches: the lowering before the global order hung these."""
    hung = []
    for name, num_ranks, num_microbatches in _cases():
        schedule = receives_posted_at_use(lowered(name, num_ranks, num_microbatches))
        try:
            nccl_rules.check_first_step(schedule, connections=1)
        except NcclDeadlock:
            hung.append((name, num_ranks, num_microbatches))
    assert sorted(hung) == sorted(
        [("interleaved-1f1b", 2, 4), ("interleaved-1f1b", 2, 8), ("bitpipe", 4, 16), ("bitpipe", 8, 32)]
        + [("breadth-first", d, n) for d, n in ((2, 4), (2, 8), (4, 8), (4, 16), (8, 16), (8, 32))]
        + [("v-zb", d, n) for d, n in ((2, 4), (2, 8), (4, 8), (4, 16), (8, 16), (8, 32))]
    )


def test_receives_posted_at_use_do_not_hang_with_a_queue_per_stream():
    for case in _cases():
        nccl_rules.check_first_step(receives_posted_at_use(lowered(*case)), connections=None)


def test_a_send_behind_an_unmatched_send_on_one_hardware_queue_is_reported_with_both():
    schedule = receives_posted_at_use(lowered("interleaved-1f1b", 2, 4))
    with pytest.raises(NcclDeadlock) as caught:
        nccl_rules.check_first_step(schedule, connections=1)
    assert str(caught.value).startswith(
        "rank 0's GPU cannot start send 'activation of stage 0 microbatch 3' on channel 0->1 "
        "(posted at 0SEND_F3): it waits for send 'gradient of stage 2 microbatch 0' on channel "
        "0->1 (posted at 2SEND_B0), which rank 1 has not matched (one hardware queue: everything "
        "launched after it waits too); rank 1's GPU cannot start"
    )


def test_device_wide_syncs_hang_receives_posted_at_use():
    """A sync waits for the rank's sends; with receives posted late, each rank's send waits for a
    receive the other posts after its own sync."""
    schedule = receives_posted_at_use(lowered("1f1b", 2, 4))
    with pytest.raises(NcclDeadlock, match="rank 0 waits at sync 8 of rank 0: a device-wide sync waits for send"):
        replay_with_syncs(schedule, {0: [8], 1: [9]}, connections=None)


@pytest.mark.parametrize("name", BIDIRECTIONAL)
@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_lazily_created_channels_hang_receives_posted_at_use(name, num_ranks):
    with pytest.raises(NcclDeadlock, match="the first call on channel"):
        schedule = receives_posted_at_use(lowered(name, num_ranks, 2 * num_ranks))
        nccl_rules.check_first_step(schedule, initialize=False)


def test_lazy_creation_hang_at_two_ranks_names_both_first_sends():
    with pytest.raises(NcclDeadlock) as caught:
        nccl_rules.check_first_step(receives_posted_at_use(lowered("bitpipe", 2, 4)), initialize=False)
    assert str(caught.value) == (
        "rank 0 waits at 0SEND_F0: the first call on channel 0->1 blocks until rank(s) 1 call on "
        "it too; rank 1 waits at 4SEND_F1: the first call on channel 1->0 blocks until rank(s) 0 "
        "call on it too"
    )


@pytest.mark.parametrize("name", ["1f1b", "v-half", "bitpipe"])
def test_one_communicator_for_both_directions_of_a_pair_hangs_receives_posted_at_use(name):
    """A send queued behind a receive on one NCCL stream. The global order does not need a
    channel per direction; channels still let a send and a receive run at once."""
    schedule = receives_posted_at_use(lowered(name, 4, 8))
    programs = nccl_rules.first_step_calls(schedule, initialize=False, channels=False)
    members = nccl_rules.communicator_members(schedule.placement, channels=False)
    with pytest.raises(NcclDeadlock, match="pipeline pair"):
        nccl_rules.replay(programs, members)


def test_a_receive_matched_with_another_message_is_reported():
    """Tags are ignored: swapping two receives on one channel would silently mix the data."""
    schedule = lowered("1f1b", 2, 4)
    programs = [list(calls) for calls in nccl_rules.first_step_calls(schedule, initialize=True)]
    receives = [i for i, call in enumerate(programs[1]) if call.kind == "recv" and call.peer == 0]
    first, second = receives[1], receives[2]
    a, b = programs[1][first], programs[1][second]
    programs[1][first], programs[1][second] = a._replace(payload=b.payload), b._replace(payload=a.payload)
    with pytest.raises(
        NcclMismatch,
        match=r"^channel 0->1: rank 0 sends the activation of stage 0 microbatch 0 \(during "
        r"0SEND_F0\) where rank 1 expects the activation of stage 0 microbatch 1",
    ):
        nccl_rules.replay(programs, nccl_rules.communicator_members(schedule.placement))


def test_setup_order_cannot_hang_whatever_the_overlap_of_communicators():
    generator = random.Random(7)
    ranks = range(6)
    specs = []
    for index in range(40):
        members = tuple(sorted(generator.sample(ranks, generator.choice([2, 2, 3, 4]))))
        sender = members[0] if len(members) == 2 and index % 2 else None
        specs.append(CommunicatorSpec(f"c{index}", members, sender))
    members = {spec.name: spec.ranks for spec in specs}
    nccl_rules.replay([nccl_rules.setup_calls(specs, rank) for rank in ranks], members)


def test_setup_in_per_rank_orders_that_disagree_hangs():
    """The check above can fail: two ranks that touch two communicators in opposite orders
    wait for each other."""
    first, second = CommunicatorSpec("a", (0, 1)), CommunicatorSpec("b", (0, 1))
    calls = nccl_rules.setup_calls([first, second], 0)
    posts_then_waits = [calls[2:4], calls[0:2]]
    reordered = [call._replace(handle=index) for index, call in enumerate(itertools.chain(*posts_then_waits))]
    reordered = [
        call._replace(handle=index - 1) if call.kind == "wait" else call
        for index, call in enumerate(reordered)
    ]
    with pytest.raises(NcclDeadlock, match="the first call on"):
        nccl_rules.replay([calls, reordered], {"a": (0, 1), "b": (0, 1)})


def test_setup_walks_communicators_by_members_then_name():
    specs = step_communicators(lowered("bitpipe", 4, 8).placement)
    order = [spec.name for spec in initialization_order(specs, 1)]
    assert order == [
        "channel 0->1",
        "channel 1->0",
        "pipeline 0,1,2,3",
        "channel 1->2",
        "channel 2->1",
        "replicas 1,2",
    ]


def test_recording_follows_the_executor_posts_and_waits():
    schedule = lowered("1f1b", 2, 2)
    calls = nccl_rules.record_step(schedule, 0)
    described = [(call.kind, call.communicator, call.during) for call in calls]
    assert described == [
        ("send", "channel 0->1", "0SEND_F0"),
        ("send", "channel 0->1", "0SEND_F1"),
        ("recv", "channel 1->0", "0RECV_B0"),
        ("wait", "channel 1->0", "0B0"),  # the gradient, before B0
        ("wait", "channel 0->1", "0B0"),  # then 0SEND_F0 and 0SEND_F1: rank 1 had posted both
        ("wait", "channel 0->1", "0B0"),  # receives before it sent this gradient
        ("recv", "channel 1->0", "0RECV_B1"),
        ("wait", "channel 1->0", "0B1"),
        ("collective", "data-parallel 0", "0REDUCE_GRAD"),
        ("wait", "data-parallel 0", "finalize (gradient reductions)"),
        ("sync", "", "the optimizer step (the gradient norm read on the host)"),
    ]


def test_v_shape_losses_are_reduced_over_the_pipeline_group():
    schedule = lowered("v-zb", 4, 8)
    assert schedule.placement.loss_ranks() == {0}
    for rank in range(4):
        last_calls = nccl_rules.record_step(schedule, rank)[-3:]
        assert [(call.kind, call.communicator) for call in last_calls] == [
            ("collective", "pipeline 0,1,2,3"),
            ("wait", "pipeline 0,1,2,3"),
            ("sync", ""),
        ]
