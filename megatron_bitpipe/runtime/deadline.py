"""No rank waits forever: every phase of a run has a deadline, kept by one thread per process.

The main thread enters phases (``with deadline.phase("set-up: process groups", 180):``); a daemon
thread checks the current one every ``poll_s``. A phase that gives ``progress`` (the executor's
action count) restarts its clock whenever that moves, so the budget of a step applies to each
action, however long the step. A phase past its budget prints one line naming the rank, the phase
and what it waits on (``waiting``: the message, peer and action) and ends the process: the main
thread may be stuck inside a collective or a CUDA call that no Python code can interrupt.

A phase also turns a backend failure (gloo's ``Connection closed by peer`` when a peer died) into
one line, ``PhaseError``, naming the rank and the phase.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Callable

from megatron_bitpipe.runtime.errors import P2PError, backend_reason
from megatron_bitpipe.runtime.watchdog import exit_process


class PhaseError(RuntimeError):
    """A phase failed because a peer or the backend did; the text names the rank and the phase."""


class _Phase:
    """The phase the main thread is in; the deadline thread moves ``started`` on progress."""

    def __init__(
        self,
        name: str,
        seconds: float,
        started: float,
        progress: Callable[[], object] | None,
        waiting: Callable[[], str | None] | None,
    ) -> None:
        self.name, self.seconds, self.started = name, seconds, started
        self.progress, self.waiting = progress, waiting
        self.marker = progress() if progress is not None else None


class Deadline:
    """The deadline of the phase this process is in (``phase``); one daemon thread."""

    def __init__(
        self,
        rank: int,
        *,
        poll_s: float = 0.5,
        on_expire: Callable[[str], None] = exit_process,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank = rank
        self.poll_s = poll_s
        self.on_expire = on_expire
        self._clock = clock
        self._current: _Phase | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bitpipe-deadline", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def phase(
        self,
        name: str,
        seconds: float,
        *,
        progress: Callable[[], object] | None = None,
        waiting: Callable[[], str | None] | None = None,
    ) -> Iterator[None]:
        """Run the block within ``seconds`` (of no progress, with ``progress``)."""
        outer = self._current
        self._current = _Phase(name, seconds, self._clock(), progress, waiting)
        try:
            yield
        except (P2PError, PhaseError):
            raise
        except RuntimeError as error:
            during = waiting() if waiting is not None else None
            detail = f" ({during})" if during else ""
            raise PhaseError(
                f"rank {self.rank}: {name} failed{detail}: {backend_reason(error)}"
            ) from error
        finally:
            self._current = outer

    def close(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.poll_s):
            current = self._current
            if current is None:
                continue
            now = self._clock()
            if current.progress is not None:
                marker = current.progress()
                if marker != current.marker:
                    current.marker, current.started = marker, now
                    continue
            if now - current.started > current.seconds:
                waiting = current.waiting() if current.waiting is not None else None
                detail = f", waiting for {waiting}" if waiting else ""
                self.on_expire(
                    f"rank {self.rank}: {current.name} made no progress within "
                    f"{current.seconds:g} s{detail}; stopping this rank"
                )
                return
