"""How P2P waits: never with a host-blocking timeout on NCCL, yet every hang is still named.

In-process, with stand-in works (no process group): ``waits="watchdog"`` is the NCCL path.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch

from megatron_bitpipe.runtime import P2P, P2PTimeoutError, Watchdog
from megatron_bitpipe.schedules import placement as placements
from megatron_bitpipe.schedules.ir import Action, Kind
from fake_works import FakeWork


def buffer(action: Action) -> torch.Tensor:
    return torch.zeros(4)


def test_watchdog_waits_never_pass_a_timeout_to_the_backend(works):
    watchdog = Watchdog(poll_s=60)
    p2p = P2P(placements.looped(2), 1, buffer, waits="watchdog", watchdog=watchdog)
    receive, send = Action(1, Kind.RECV_F, 0), Action(1, Kind.SEND_B, 0)
    p2p.post_recv(receive)
    p2p.wait_recv(receive)
    p2p.send(send, torch.ones(4))
    p2p.finish()
    assert [work.waits for work in works] == [[None], [None]]
    assert watchdog.num_watched == 2
    watchdog.close()


def test_blocking_waits_pass_the_timeout(works):
    p2p = P2P(placements.looped(2), 1, buffer, timeout_s=7.0)
    receive = Action(1, Kind.RECV_F, 0)
    p2p.post_recv(receive)
    p2p.wait_recv(receive)
    assert works[0].waits == [timedelta(seconds=7.0)]


def test_completed_works_are_forgotten(works):
    watchdog = Watchdog(poll_s=60)
    p2p = P2P(placements.looped(2), 1, buffer, waits="watchdog", watchdog=watchdog)
    for microbatch in range(3):
        action = Action(1, Kind.RECV_F, microbatch)
        p2p.post_recv(action)
        p2p.wait_recv(action)
    works[0].done = works[1].done = True
    p2p.release_completed()
    assert watchdog.num_watched == 1
    watchdog.close()


def test_a_missed_deadline_is_raised_with_rank_peer_and_action(works):
    watchdog = Watchdog(poll_s=0.01)
    p2p = P2P(placements.looped(2), 1, buffer, timeout_s=0.05, waits="watchdog", watchdog=watchdog)
    receive = Action(1, Kind.RECV_F, 3)
    p2p.post_recv(receive)
    p2p.wait_recv(receive)  # returns at once: the host does not wait
    deadline = time.monotonic() + 5
    with pytest.raises(P2PTimeoutError) as caught:
        while time.monotonic() < deadline:
            p2p.release_completed()
            time.sleep(0.01)
    assert str(caught.value) == (
        "rank 1: timed out after 0.05 s waiting for RECV_F of stage 1 microbatch 3 from rank 0"
    )
    watchdog.close()


def test_a_hang_the_main_thread_never_returns_from_ends_the_process():
    hung = threading.Event()
    messages: list[str] = []

    def on_hang(message: str) -> None:
        messages.append(message)
        hung.set()

    watchdog = Watchdog(poll_s=0.01, grace_s=0.05, on_hang=on_hang)
    watchdog.watch(FakeWork(), 0.02, "rank 3: timed out after 0.02 s waiting for SEND_F of stage 3")
    assert hung.wait(5)
    assert messages == [
        "rank 3: timed out after 0.02 s waiting for SEND_F of stage 3 (the main thread did not "
        "return within 0.05 s; ending the process)"
    ]


def test_a_work_that_completes_in_time_raises_nothing():
    work = FakeWork()
    watchdog = Watchdog(poll_s=0.01, on_hang=lambda message: pytest.fail(message))
    watchdog.watch(work, 0.03, "never")
    work.done = True
    time.sleep(0.1)
    watchdog.check()
    watchdog.close()


def test_sends_are_completed_when_the_peer_proves_it_posted_the_receive(works):
    """``completions``: the RECV whose message the peer sent after posting our send's receive."""
    receive, send = Action(1, Kind.RECV_F, 1), Action(1, Kind.SEND_B, 0)
    p2p = P2P(placements.looped(2), 1, buffer, completions={receive: (send,)})
    p2p.send(send, torch.ones(4))
    p2p.post_recv(receive)
    assert p2p.held_bytes == 16
    p2p.wait_recv(receive)
    assert p2p.held_bytes == 0 and p2p.peak_held_bytes == 16
    assert p2p.outstanding() == []
