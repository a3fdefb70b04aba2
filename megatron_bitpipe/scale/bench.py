"""Real runs on this machine: the trainer under torchrun, its step times and memory read back.

``run_schedules`` starts ``python -m megatron_bitpipe.train`` once for several schedules (they run
one after the other in one process group, same weights and data), with ``--measure-memory``, each
rank pinned to its own cores where the ranks fit (``OMP_NUM_THREADS`` = cores per rank), and
returns, from the run's ``--report``, per schedule the step times between the first (warm-up)
iteration and the last (whose memory is measured, on CPU under torch's profiler) and each rank's
peak activation memory.
``megatron-bitpipe bench``, ``sweep --run-local`` and ``scripts/gpu_check.py`` use it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from megatron_bitpipe import run_report


@dataclass(frozen=True)
class Measured:
    """One schedule's real run: step times between warm-up and the memory-measured last iteration
    (ms), and peak activation bytes per rank."""

    schedule: str
    step_ms: tuple[float, ...]
    peak_activation_bytes: tuple[int, ...]
    tokens_per_step: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / (self.median_ms / 1e3)

    def figures(self) -> dict[str, str]:
        return {
            "step_ms_median": f"{self.median_ms:.1f}",
            "step_ms_min": f"{min(self.step_ms):.1f}",
            "step_ms_max": f"{max(self.step_ms):.1f}",
            "tokens_per_s": f"{self.tokens_per_s:.1f}",
            "peak_activation_bytes": str(max(self.peak_activation_bytes)),
        }


class BenchError(RuntimeError):
    """A run that failed: its exit status and the end of its output."""


PIN_VARIABLE = "MEGATRON_BITPIPE_PIN_CORES"
"""Set to 1 (``run_schedules`` does, where the ranks fit the cores): the trainer pins each local
rank to its own share of the cores, as ``taskset`` would."""


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. under taskset or a cgroup)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_order(schedules: Sequence[str], run: int) -> list[str]:
    """The schedules in the order run ``run`` (from 0) trains them: as given, then reversed, and
    so on, so that drift within a process (later schedules ran faster) hits them all alike."""
    return list(schedules) if run % 2 == 0 else list(reversed(schedules))


def run_repeated(processes: int, schedules: Sequence[str], arguments: Sequence[str], tokens_per_step: int,
                 repeat: int, profile_folder: str | None = None, *,
                 progress: bool = True) -> list[dict[str, Measured]]:
    """``repeat`` trainer runs of ``schedules`` in alternating order; with ``profile_folder`` each
    run ``k`` also writes ``profile_folder/run{k}/{schedule}.json`` (``--profile-step``)."""
    runs = []
    for run in range(repeat):
        extra: list[str] = []
        if profile_folder is not None:
            folder = os.path.join(profile_folder, f"run{run}")
            shutil.rmtree(folder, ignore_errors=True)  # no file of an earlier bench is read as this one's
            os.makedirs(folder, exist_ok=True)
            extra = ["--profile-step", os.path.join(folder, "{schedule}.json")]
        order = run_order(schedules, run)
        if progress:
            print(f"bench: run {run + 1}/{repeat}: {', '.join(order)}", flush=True)
        runs.append(run_schedules(processes, order, [*arguments, *extra], tokens_per_step))
    return runs


def trainer_command(processes: int, schedules: Sequence[str], arguments: Sequence[str],
                    report: str) -> list[str]:
    """torchrun (or one process) running the trainer on ``schedules`` with ``arguments``,
    writing its ``--report`` to ``report``."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [*launcher, "-m", "megatron_bitpipe.train", *arguments,
            "--pipeline-schedule", ",".join(schedules), "--measure-memory", "--report", report]


def run_schedules(processes: int, schedules: Sequence[str], arguments: Sequence[str], tokens_per_step: int,
                  *, timeout: float = 1800) -> dict[str, Measured]:
    """Run the trainer once for ``schedules``; raise BenchError when it fails."""
    cores = usable_cores()
    threads = max(1, cores // processes)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    if processes <= cores:
        environment[PIN_VARIABLE] = "1"
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        report_path = os.path.join(folder, "report.json")
        command = trainer_command(processes, schedules, arguments, report_path)
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
        log = result.stdout + result.stderr
        if result.returncode != 0:
            raise BenchError(f"{' '.join(command)} exited {result.returncode}: {_failure_lines(log)}")
        try:
            report = run_report.read(report_path)
        except run_report.ReportError as error:
            raise BenchError(str(error)) from None
    return parse(report, schedules, tokens_per_step)


def _failure_lines(log: str, tail: int = 2000) -> str:
    """The log's error lines (every rank's, wherever they are) and its last ``tail`` characters."""
    errors = [line for line in log.splitlines() if "Error" in line or "error:" in line or "FAILED" in line]
    head = "\n".join(dict.fromkeys(errors))[-4000:]
    return f"{head}\n...\n{log[-tail:]}" if head else log[-tail:]


def parse(report: Mapping[str, Any], schedules: Sequence[str], tokens_per_step: int) -> dict[str, Measured]:
    """Per schedule of a trainer's ``--report``: step times between warm-up and the last
    iteration, peak memory; BenchError when a schedule lacks them."""
    by_schedule = run_report.by_schedule(report)
    measured = {}
    for schedule in schedules:
        entry = by_schedule.get(schedule, {"iterations": [], "peak_memory_bytes": None})
        steps = run_report.step_ms(entry)
        peak = entry["peak_memory_bytes"]
        if len(steps) < 3 or peak is None:
            raise BenchError(f"{schedule}: the report has {len(steps)} iterations and "
                             f"{'a' if peak else 'no'} peak memory; give --train-iters >= 3")
        peaks = tuple(int(value) for value in peak if value is not None)
        measured[schedule] = Measured(schedule, tuple(steps[1:-1]), peaks or (0,), tokens_per_step)
    return measured
