"""What the executor's trace measures: host time on the CPU, GPU time on CUDA.

A clock hands out a mark when an action starts and ends; marks become seconds only when the trace
is read, after the step. ``WallClock`` marks are ``time.perf_counter()`` values. ``CudaEventClock``
marks are CUDA events recorded on the current stream: reading them waits for the GPU, so the
timeline shows when the kernels ran rather than when the host queued them. Its seconds share
``perf_counter``'s time base: the run's first event is placed at the host time it was queued,
which is early by whatever was still queued on the GPU then (little, right after an optimizer
step). Two events per action cost device work every step, so ``default_clock`` uses them only
for steps that are traced.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch


class Clock(Protocol):
    """Marks taken during a run, turned into seconds afterwards."""

    def start(self) -> None:
        """Called when a run begins."""

    def mark(self) -> Any:
        """A point in time, cheap to take."""

    def seconds(self, mark: Any) -> float:
        """The mark in ``time.perf_counter`` seconds (may wait for the device)."""


class WallClock:
    """Host time: ``time.perf_counter``."""

    def start(self) -> None:
        return None

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, mark: float) -> float:
        return mark


class CudaEventClock:
    """GPU time from CUDA events on the current stream (no host synchronization while marking)."""

    def __init__(self) -> None:
        self._origin: torch.cuda.Event | None = None
        self._origin_seconds = 0.0

    def start(self) -> None:
        self._origin = self.mark()
        self._origin_seconds = time.perf_counter()

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, mark: torch.cuda.Event) -> float:
        if self._origin is None:
            raise RuntimeError("CudaEventClock.seconds before start")
        mark.synchronize()
        return self._origin_seconds + self._origin.elapsed_time(mark) / 1e3


class CpuTimeClock:
    """Host time and this process's CPU time (``time.process_time``: every thread of the rank,
    its intra-op threads included) at each mark: an action's CPU time is what it costs on cores
    of its own, whatever else shares the machine's cores."""

    def start(self) -> None:
        return None

    def mark(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def seconds(self, mark: tuple[float, float]) -> float:
        return mark[0]

    def cpu_seconds(self, mark: tuple[float, float]) -> float:
        """The process's CPU time at the mark (seconds since an arbitrary origin)."""
        return mark[1]


def default_clock(*, trace: bool = False, cpu_time: bool = False) -> Clock:
    """CUDA events for a traced step on a GPU; host (and, with ``cpu_time``, process CPU) time
    otherwise (no device work)."""
    if trace and torch.cuda.is_available():
        return CudaEventClock()
    return CpuTimeClock() if cpu_time else WallClock()
