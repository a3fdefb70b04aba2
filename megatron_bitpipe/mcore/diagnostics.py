"""Measurements a run can ask for around its steps: peak memory and host syncs.

``step_checks`` wraps a step with ``--measure-memory`` (the last iteration) and
``--check-host-syncs`` (from iteration 2: ``torch.cuda.set_sync_debug_mode("error")`` on a GPU
and the call audit everywhere) and keeps what it found; ``report_memory`` and
``report_host_syncs`` log it for every rank after training (``report_memory`` also returns it,
for ``--report``).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_bitpipe.mcore import forward_backward
from megatron_bitpipe.mcore.reporting import log, per_rank
from megatron_bitpipe.runtime.host_syncs import HostSyncAudit
from megatron_bitpipe.runtime.memory import PeakMemory


@dataclass
class Findings:
    """What the checks found: peak bytes of the measured step, host syncs by call."""

    peak_memory: int | None = None
    host_syncs: dict[str, list[Any]] = field(default_factory=dict)


@contextlib.contextmanager
def step_checks(args: argparse.Namespace, iteration: int, findings: Findings) -> Iterator[None]:
    """--measure-memory (last iteration) and --check-host-syncs (from iteration 2) around a step."""
    with contextlib.ExitStack() as stack:
        peak = None
        if args.measure_memory and iteration == args.train_iters:
            peak = stack.enter_context(PeakMemory())
        audit = None
        if args.check_host_syncs and iteration >= 2:
            audit = stack.enter_context(HostSyncAudit())
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("error")
                stack.callback(torch.cuda.set_sync_debug_mode, "default")
        yield
    if peak is not None:
        findings.peak_memory = peak.bytes
    if audit is not None:
        for name, (count, where) in audit.calls.items():
            entry = findings.host_syncs.setdefault(name, [0, where])
            entry[0] += count


def report_memory(findings: Findings, *, registry: bool) -> tuple[list[Any], list[Any] | None]:
    """Log and return every rank's peak step memory and, for our executor, its sends not yet
    known complete (None for megatron's schedules)."""
    peaks = per_rank(findings.peak_memory)
    log(f"peak activation memory per rank (bytes): {peaks}")
    executor = forward_backward.last_executor()
    held = None
    if registry and executor is not None and executor.p2p is not None:
        held = per_rank(executor.p2p.peak_held_bytes)
        log(f"of which sends not yet known complete, per rank (bytes): {held}")
    return peaks, held


def report_host_syncs(findings: Findings, schedule: str, train_iters: int) -> None:
    """Log the host syncs every rank's steps made after the first; raise if there were any."""
    everyone = per_rank(findings.host_syncs)
    found = {
        f"rank {rank}: {name} x{count} (first at {where})"
        for rank, calls in enumerate(everyone)
        for name, (count, where) in calls.items()
    }
    iterations = f"iterations 2-{train_iters}"
    if found:
        raise RuntimeError(
            f"{schedule}: host syncs in the step ({iterations}): " + "; ".join(sorted(found))
        )
    log(f"host syncs in the step ({iterations}): none")
