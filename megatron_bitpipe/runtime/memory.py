"""The most memory a block of code held at once beyond what it started with, in bytes.

On CUDA this is ``torch.cuda.max_memory_allocated`` after a reset, minus the allocation at entry.
On the CPU it counts bytes: torch's profiler records every allocation and free of its CPU
allocator with the running total, and the peak of that total during the block is the answer.
The CPU path runs the profiler for the whole block (slow: use it on a step, not a loop) and reads
its allocation events through ``experimental_event_tree``, an API torch marks experimental.
"""

from __future__ import annotations

from typing import Any

import torch


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.bytes``."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self.bytes = 0
        self._start = 0
        self._profiler: Any = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._profiler.__exit__(*exc)
        self.bytes = _cpu_peak(self._profiler)


def _cpu_peak(profiler: Any) -> int:
    """Peak of the allocator's running total over the profiled block, from its start."""
    allocations: list[tuple[int, int, int]] = []
    pending = list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        fields = event.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            allocations.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not allocations:
        return 0
    allocations.sort()
    _, first_size, first_total = allocations[0]
    baseline = first_total - first_size
    return max(total for _, _, total in allocations) - baseline
