"""Properties over random valid (schedule, D, N, vp), found with hypothesis.

* every schedule the registry accepts validates, lowers, validates again and simulates;
* its first step replayed under NCCL's rules, after the communicator set-up, never hangs;
* a send's early completion always comes after the send, on a message the peer sent after
  posting the receive;
* small cases train: every rank's executor in its own thread, messages through in-memory
  channels (matched in order, as gloo and NCCL do), the toy fp64 stages of ``test_runtime`` give
  the single-process losses and gradients.
"""

from __future__ import annotations

import threading

import pytest

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_runtime import ToyStages, oracle  # noqa: E402

from megatron_bitpipe.runtime import P2P, Executor, nccl_rules  # noqa: E402
from megatron_bitpipe.schedules import ScheduleConfigError, build, get, lower, names  # noqa: E402
from megatron_bitpipe.schedules.ir import Kind  # noqa: E402
from megatron_bitpipe.schedules.lower import send_completions  # noqa: E402
from megatron_bitpipe.schedules.simulate import simulate  # noqa: E402
from megatron_bitpipe.schedules.validate import validate  # noqa: E402


@st.composite
def schedules(draw, max_ranks: int = 8, max_microbatches: int = 24):
    """A (name, D, N, options) the registry accepts, built."""
    name = draw(st.sampled_from(names()))
    num_ranks = draw(st.integers(1, max_ranks))
    num_microbatches = draw(st.integers(1, max_microbatches))
    options = {}
    if "vp" in get(name).options:
        options["vp"] = draw(st.integers(2, 3))
    try:
        return build(name, num_ranks, num_microbatches, **options)
    except ScheduleConfigError:
        assume(False)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@SETTINGS
@given(schedules())
def test_every_accepted_schedule_lowers_validates_and_simulates(schedule):
    lowered = lower(schedule, grad_sync=True)
    validate(lowered)
    result = simulate(lowered)
    assert result.makespan > 0
    assert len(result.peak_activations) == schedule.num_ranks


@SETTINGS
@given(schedules())
def test_no_first_step_hangs_under_nccls_rules(schedule):
    nccl_rules.check_first_step(lower(schedule, grad_sync=True), initialize=True)


@SETTINGS
@given(schedules())
def test_early_send_completions_follow_the_send_and_the_peers_receive(schedule):
    lowered = lower(schedule)
    positions = [{action: index for index, action in enumerate(p)} for p in lowered.programs]
    placement = lowered.placement
    for rank, completions in enumerate(send_completions(lowered)):
        for proof, sends in completions.items():
            for send in sends:
                assert positions[rank][proof] > positions[rank][send]
                peer = placement.stage_ranks[
                    send.stage + 1 if send.kind is Kind.SEND_F else send.stage - 1
                ]
                assert peer != rank


# --- small cases train, one thread per rank --------------------------------------------------------


class _Sent:
    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class Mailbox:
    """The messages of one (sender, receiver) pair: the k-th receive posted gets the k-th
    message sent, whenever it is waited on (a backend matches at posting time, in order)."""

    def __init__(self) -> None:
        self.messages: list[torch.Tensor] = []
        self.posted = 0
        self.arrived = threading.Condition()

    def send(self, payload: torch.Tensor) -> None:
        with self.arrived:
            self.messages.append(payload.clone())
            self.arrived.notify_all()

    def reserve(self) -> int:
        self.posted += 1  # only the receiving rank's thread posts on its mailboxes
        return self.posted - 1

    def take(self, index: int) -> torch.Tensor:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.messages) > index, timeout=20):
                raise TimeoutError(f"message {index} never arrived")
            return self.messages[index]


class _Receiving:
    def __init__(self, mailbox: Mailbox, buffer: torch.Tensor) -> None:
        self.mailbox, self.buffer, self.index = mailbox, buffer, mailbox.reserve()

    def wait(self, timeout=None) -> bool:
        self.buffer.copy_(self.mailbox.take(self.index))
        return True

    def is_completed(self) -> bool:
        return False


class ThreadedP2P(P2P):
    """P2P over in-memory mailboxes, one per (sender, receiver), matched in posting order."""

    def __init__(self, placement, rank, mailboxes, make_buffer):
        super().__init__(placement, rank, make_buffer)
        self.mailboxes = mailboxes

    def _start_send(self, payload, peer):
        self.mailboxes[(self.rank, peer)].send(payload)
        return _Sent()

    def _start_recv(self, buffer, peer):
        return _Receiving(self.mailboxes[(peer, self.rank)], buffer)


def train_in_threads(schedule) -> tuple[list[ToyStages], list[BaseException]]:
    lowered = lower(schedule)
    layout = lowered.placement
    stages = [
        ToyStages(layout, rank, 1.0 / lowered.num_microbatches) for rank in range(layout.num_ranks)
    ]
    if layout.num_pipelines == 2:  # both replicas start from the down copy's weights
        modules = {stage: module for toy in stages for stage, module in toy.modules.items()}
        for stage, module in modules.items():
            if layout.pipeline_of(stage) == 1:
                module.load_state_dict(modules[layout.replica_of(stage)].state_dict())
    mailboxes = {
        (sender, receiver): Mailbox()
        for sender in range(layout.num_ranks)
        for receiver in range(layout.num_ranks)
    }
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            from test_runtime import make_buffer

            p2p = ThreadedP2P(layout, rank, mailboxes, make_buffer)
            Executor(layout, rank, stages[rank], p2p).run(lowered.programs[rank])
        except BaseException as error:  # reported by the test
            errors.append(error)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(layout.num_ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a rank did not finish"
    return stages, errors


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(schedules(max_ranks=4, max_microbatches=8))
def test_small_cases_train_to_the_single_process_losses_and_gradients(schedule):
    stages, errors = train_in_threads(schedule)
    assert not errors, errors
    layout = schedule.placement
    losses, grads = oracle(layout.stages_per_pipeline, schedule.num_microbatches)
    computed = {mb: loss for toy in stages for mb, loss in toy.losses.items()}
    assert sorted(computed) == list(range(schedule.num_microbatches))
    for microbatch, loss in computed.items():
        assert loss == pytest.approx(losses[microbatch], rel=1e-12)
    summed: dict[int, list[torch.Tensor]] = {}
    for toy in stages:
        for stage, module in toy.modules.items():
            position = layout.position(stage)
            parameters = [parameter.grad for parameter in module.parameters()]
            if position in summed:
                summed[position] = [a + b for a, b in zip(summed[position], parameters, strict=True)]
            else:
                summed[position] = parameters
    for position, parameters in summed.items():
        for got, want in zip(parameters, grads[position], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
