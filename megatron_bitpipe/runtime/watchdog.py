"""Timeouts for waits that must not block the host (NCCL), with errors that name what hung.

On NCCL, ``work.wait(timeout)`` blocks the host until the GPU has finished the operation (measured
on an H200: 47 ms with 40 ms of GEMMs queued, against 0.3 ms for a plain ``wait()``), so the
runtime calls plain ``wait()``, which only orders the compute stream after the operation, and
hands the work to a ``Watchdog``:

* ``watch`` records the work with its deadline and the text naming rank, peer and action;
* ``release_completed`` (the executor calls it after every action) drops the oldest works while
  ``is_completed()`` says they are done, so nothing is kept alive longer than needed;
* a daemon thread looks at the works past their deadline; one that is still not complete becomes
  the failure. The main thread raises it (``P2PTimeoutError``) at its next ``check``; if it does
  not get there within ``grace_s`` (it is stuck in a CUDA call behind the hung kernel), the thread
  prints the message and ends the process through ``on_hang``.

The thread polls on the CUDA device that was current when it started (``torch.cuda.set_device``
in the thread): a thread starts on device 0, and a query from there would create a context on
GPU 0 for every rank.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import Callable, Protocol

import torch

from megatron_bitpipe.runtime.errors import P2PTimeoutError


class Waitable(Protocol):
    """The part of ``torch.distributed.Work`` the watchdog uses."""

    def is_completed(self) -> bool: ...


def exit_process(message: str) -> None:
    """Print the message and end the process with status 1, now, with the processes it started.

    ``os._exit`` skips the interpreter's clean-up, which would wait for the very peers that are
    gone; the children (megatron-core's checkpoint writers) are killed first, or they would
    outlive us holding our output open.
    """
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    kill_children()
    os._exit(1)


def kill_children() -> None:
    """SIGKILL every process this one started (and theirs), where psutil can list them."""
    try:
        import psutil
    except ImportError:
        return
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


def current_cuda_device() -> int | None:
    """The calling thread's CUDA device, or None where this process has not initialized CUDA
    (the query then creates no context)."""
    if not torch.cuda.is_initialized():
        return None
    return torch.cuda.current_device()


class Watchdog:
    """Deadlines for works the host does not wait for; one daemon thread, started on first use."""

    def __init__(
        self,
        *,
        poll_s: float = 0.5,
        grace_s: float = 10.0,
        on_hang: Callable[[str], None] = exit_process,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.on_hang = on_hang
        self._clock = clock
        self._lock = threading.Lock()
        self._watched: deque[tuple[Waitable, float, str]] = deque()
        self._failure: str | None = None
        self._reported = False
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def watch(self, work: Waitable, timeout_s: float, message: str) -> None:
        """Expect ``work`` complete within ``timeout_s``; ``message`` is the error if it is not.

        A work already complete (gloo's, after its blocking wait) is not kept.
        """
        if work.is_completed():
            return
        with self._lock:
            self._watched.append((work, self._clock() + timeout_s, message))
        if self._thread is None:
            device = current_cuda_device()
            self._thread = threading.Thread(
                target=self._run, args=(device,), name="bitpipe-watchdog", daemon=True
            )
            self._thread.start()

    def release_completed(self) -> None:
        """Forget the oldest works while they are complete (cheap: one query per call)."""
        with self._lock:
            while self._watched and self._watched[0][0].is_completed():
                self._watched.popleft()

    def check(self) -> None:
        """Raise ``P2PTimeoutError`` if a watched work missed its deadline."""
        if self._failure is not None:
            self._reported = True
            raise P2PTimeoutError(self._failure)

    @property
    def num_watched(self) -> int:
        return len(self._watched)

    def close(self) -> None:
        """Stop the thread (tests; a process that exits needs nothing)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, device: int | None) -> None:
        if device is not None:
            torch.cuda.set_device(device)
        found_at = 0.0
        while not self._stopped.wait(self.poll_s):
            if self._reported:
                return
            if self._failure is None:
                found_at = self._clock()
                self._failure = self._expired()
            elif self._clock() - found_at >= self.grace_s:
                self.on_hang(
                    f"{self._failure} (the main thread did not return within "
                    f"{self.grace_s:g} s; ending the process)"
                )
                return

    def _expired(self) -> str | None:
        now = self._clock()
        with self._lock:
            overdue = [(work, message) for work, deadline, message in self._watched if deadline <= now]
        for work, message in overdue:
            if not work.is_completed():
                return message
        return None
