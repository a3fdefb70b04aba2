"""The CUDA path on one GPU, in under five minutes: one line per check, PASS or FAIL.

    bash scripts/gpu_check.sh          # sets up megatron-core if needed, then runs this

Two ranks cannot share a GPU under NCCL, so everything here runs at PP=1 through our executor
(the registry schedules that take one rank) against megatron-core's own
``forward_backward_no_pipelining`` (``--pipeline-schedule none``), each in one process:

1. fp32, bf16 and fp16 (dynamic loss scaling): every PP=1 schedule's ``lm loss`` equals
   ``none``'s (fp32 to 1e-5, bf16 and fp16 to 1e-2),
   with ``--check-host-syncs`` on (``torch.cuda.set_sync_debug_mode("error")`` around every step
   after the first, plus the call audit): a host sync fails the run;
2. parity: bf16, 8 layers, hidden 2048, seq 1024, the step time of ``1f1b`` through our executor
   against ``none`` (median of the iterations after the first two): ratio <= 1.02;
3. memory: the same runs' peak memory during the step (``max_memory_allocated``): ours <= 1.05x;
4. trace: the 1f1b run's ``--trace`` times actions with CUDA events, so its F and B spans add up
   to most of a step (>= 0.5 of the median step time; host-time spans of queued kernels would not).

Every figure is read from the runs' ``--report`` files (``megatron_bitpipe.run_report``).
``--logs DIR`` keeps every run's whole output and report there.

Exit status 1 when any check fails. Multi-GPU behaviour (NCCL channels, the set-up order, the
loss reduction, replicas) rests on the CPU tests and the NCCL-rules replay (tests/test_nccl_rules.py).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from megatron_bitpipe import run_report

PP1_SCHEDULES = ["none", "gpipe", "1f1b", "breadth-first", "zb-h1", "v-min", "v-half", "v-zb"]
SMALL = (
    "--num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 256 --vocab-size 1024 "
    "--micro-batch-size 2 --global-batch-size 16 --train-iters 4 --lr 1e-4 --seed 1234"
).split()
PARITY = (
    "--num-layers 8 --hidden-size 2048 --num-attention-heads 16 --seq-length 1024 "
    "--vocab-size 32000 --micro-batch-size 4 --global-batch-size 32 --train-iters 12 --lr 1e-5 "
    "--seed 1234 --bf16 --measure-memory"
).split()
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}

failures = 0
logs: str | None = None


def report(ok: bool, line: str) -> None:
    global failures
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} {line}", flush=True)


def train(arguments: list[str], name: str) -> tuple[int, str, dict[str, dict[str, Any]]]:
    """One trainer process on this GPU: (exit status, stdout + stderr, its report's entries by
    schedule, empty when it wrote none), kept in ``logs``/name.log and name.report.json."""
    with tempfile.TemporaryDirectory() as scratch:
        report_path = os.path.join(logs or scratch, f"{name}.report.json")
        command = [sys.executable, "-m", "megatron_bitpipe.train", *arguments, "--report", report_path]
        environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
        try:
            runs = run_report.by_schedule(run_report.read(report_path))
        except run_report.ReportError:
            runs = {}
    output = result.stdout + result.stderr
    if logs is not None:
        with open(os.path.join(logs, f"{name}.log"), "w") as log_file:
            log_file.write(" ".join(command) + "\n" + output)
    return result.returncode, output, runs


def worst_relative(values: list[float], reference: list[float]) -> float:
    if len(values) != len(reference) or not reference:
        return float("inf")
    return max(abs(a - b) / abs(b) for a, b in zip(values, reference, strict=True))


def check_losses_and_syncs(precision: str) -> None:
    flags = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[precision]
    arguments = [*SMALL, *flags, "--check-host-syncs", "--virtual-pipeline-model-parallel-size", "2"]
    status, log, runs = train([*arguments, "--pipeline-schedule", ",".join(PP1_SCHEDULES)], precision)
    if status != 0 or "none" not in runs:
        report(False, f"{precision}: the run failed (exit {status}): {log[-1500:]}")
        return
    reference = run_report.losses(runs["none"])
    for schedule in PP1_SCHEDULES[1:]:
        losses = run_report.losses(runs[schedule]) if schedule in runs else []
        worst = worst_relative(losses, reference)
        report(
            worst <= TOLERANCE[precision],
            f"{precision} {schedule}: lm loss equals none's (worst relative {worst:.1e}, "
            f"bound {TOLERANCE[precision]:g}, {len(losses)} iterations)",
        )
    synced = [name for name, entry in runs.items() if entry["host_syncs"] != 0]
    report(not synced, f"{precision}: no host sync in any step after the first (sync debug mode "
           f"'error' and the call audit){'; failed: ' + ', '.join(synced) if synced else ''}")


def check_parity_and_memory(trace: str) -> None:
    measured = {}
    for schedule in ("none", "1f1b"):
        traced = ["--trace", trace] if schedule == "1f1b" else []
        status, log, runs = train([*PARITY, "--pipeline-schedule", schedule, *traced], f"parity-{schedule}")
        entry = runs.get(schedule, {"iterations": [], "peak_memory_bytes": None})
        steps, peak = run_report.step_ms(entry), entry["peak_memory_bytes"]
        if status != 0 or len(steps) < 4 or peak is None:
            report(False, f"parity run {schedule} failed (exit {status}): {log[-1500:]}")
            return
        measured[schedule] = (statistics.median(steps[2:]), peak[0])
    (ours_ms, ours_bytes), (theirs_ms, theirs_bytes) = measured["1f1b"], measured["none"]
    report(
        ours_ms <= 1.02 * theirs_ms,
        f"bf16 step time, 1f1b through our executor {ours_ms:.1f} ms vs megatron's "
        f"forward_backward_no_pipelining {theirs_ms:.1f} ms: ratio {ours_ms / theirs_ms:.3f} (<= 1.02)",
    )
    report(
        ours_bytes <= 1.05 * theirs_bytes,
        f"peak memory of the step, ours {ours_bytes / 2**20:.1f} MiB vs megatron's "
        f"{theirs_bytes / 2**20:.1f} MiB: ratio {ours_bytes / theirs_bytes:.3f} (<= 1.05)",
    )
    check_trace(trace, ours_ms)


def check_trace(path: str, step_ms: float) -> None:
    """The traced step's F and B spans (GPU time) cover at least half of a step."""
    try:
        with open(path) as trace_file:
            events = json.load(trace_file)["traceEvents"]
    except (OSError, ValueError, KeyError) as error:
        report(False, f"trace: {path} unreadable: {error}")
        return
    spans = [event for event in events if event.get("ph") == "X"]
    compute_ms = sum(event["dur"] for event in spans if event["name"][:1] in "FB") / 1e3
    ordered = all(event["dur"] >= 0 for event in spans)
    report(
        ordered and compute_ms >= 0.5 * step_ms,
        f"trace: F and B spans of the last step add up to {compute_ms:.1f} ms of a "
        f"{step_ms:.1f} ms step (ratio {compute_ms / step_ms:.2f}, >= 0.5: CUDA-event time), "
        f"{len(spans)} spans",
    )


def main() -> int:
    global logs
    import argparse
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", help="keep every run's whole output in this folder")
    logs = parser.parse_args().logs
    if logs is not None:
        os.makedirs(logs, exist_ok=True)

    if not torch.cuda.is_available():
        print("FAIL no CUDA device: scripts/gpu_check.sh needs a GPU", flush=True)
        return 1
    from megatron.core import package_info

    started = time.perf_counter()
    print(
        f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"megatron-core {package_info.__version__}, Python {sys.version.split()[0]}",
        flush=True,
    )
    check_losses_and_syncs("fp32")
    check_losses_and_syncs("bf16")
    check_losses_and_syncs("fp16")
    with tempfile.TemporaryDirectory() as scratch:
        check_parity_and_memory(os.path.join(logs or scratch, "trace-1f1b.json"))
    print(f"gpu_check: {failures} failed, {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
