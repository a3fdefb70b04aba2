"""Two pipeline ranks on one GPU under NCCL: one PASS/FAIL/SKIP line per run, losses against PP=1.

    bash scripts/gpu_multirank_check.sh     # NCCL >= 2.30 (built from source if needed), then this

Each run is ``torchrun --nproc-per-node=2`` of ``python -m megatron_bitpipe.train`` at PP=2 with
both ranks on ``cuda:0``: the trainer calls ``torch.cuda.set_device(LOCAL_RANK)``, so every rank
is started with ``LOCAL_RANK=0`` (``torchrun --no-python env LOCAL_RANK=0 python ...``); RANK and
WORLD_SIZE stay torchrun's. NCCL's settings for every two-rank run:

* ``NCCL_MULTI_RANK_GPU_ENABLE=1`` (NCCL >= 2.30; earlier NCCL refuses: "Duplicate GPU detected"),
  ``NCCL_MAX_CTAS=2`` (NCCL suggests capping channels when ranks share a GPU);
* ``NCCL_BUFFSIZE=65536``: every pipeline message (seq x micro-batch x hidden x 4 bytes, fp32) is
  larger, so a send finishes only once its receive runs, the condition of the hang in issue 15;
* ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (one hardware queue per GPU, as Megatron-LM asks for with
  TP > 1) and unset (CUDA's default), each schedule once per setting.

Schedules ``bitpipe``, ``chimera``, ``v-zb`` and ``interleaved-1f1b`` (vp 2), 8 microbatches
(N = 4D). Every run's ``lm loss`` (from its ``--report``) must equal the PP=1 run's
(``--pipeline-schedule none``, one process, same model) to 1e-5 relative, and its NCCL log must
say that the ranks share the GPU.
Every launch runs under ``timeout``: a run that does not exit in ``--timeout`` seconds is a FAIL
that names the hang, and its process group is killed.

``--dry-run`` prints every launch (environment and command) instead of running it; ``--cpu`` runs
the same launches on CPU/gloo, which tests this harness and checks nothing about NCCL.
Exit status 1 when any run fails, else 0 (SKIP lines included).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpu_check import worst_relative

from megatron_bitpipe import run_report

SCHEDULES = ("bitpipe", "chimera", "v-zb", "interleaved-1f1b")
CONNECTIONS = ("1", "default")
"""Values of CUDA_DEVICE_MAX_CONNECTIONS per run; ``default`` leaves it unset."""
HIDDEN, SEQUENCE, MICRO_BATCH, GLOBAL_BATCH, BYTES_PER_VALUE = 256, 128, 2, 16, 4
TRAIN_ITERS = 4
MODEL = (
    f"--num-layers 8 --hidden-size {HIDDEN} --num-attention-heads 8 --seq-length {SEQUENCE} "
    f"--vocab-size 1024 --micro-batch-size {MICRO_BATCH} --global-batch-size {GLOBAL_BATCH} "
    f"--train-iters {TRAIN_ITERS} --lr 1e-4 --seed 1234"
).split()
TOLERANCE = 1e-5
NCCL_BUFFSIZE = 65536
MESSAGE_BYTES = SEQUENCE * MICRO_BATCH * HIDDEN * BYTES_PER_VALUE
SHARED_GPU = "Multiple ranks on the same GPU detected and allowed"
"""NCCL's INFO line (subsystem INIT) when ranks share a GPU with NCCL_MULTI_RANK_GPU_ENABLE=1."""
MULTI_RANK_ENVIRONMENT = {
    "NCCL_MULTI_RANK_GPU_ENABLE": "1",
    "NCCL_MAX_CTAS": "2",
    "NCCL_BUFFSIZE": str(NCCL_BUFFSIZE),
    "NCCL_DEBUG": "INFO",
    "NCCL_DEBUG_SUBSYS": "INIT,ENV",
}


@dataclass(frozen=True)
class Run:
    """One launch: its name in PASS/FAIL lines, its command and the environment it changes."""

    name: str
    command: tuple[str, ...]
    environment: dict[str, str | None] = field(default_factory=dict)
    """Variables set (a string) or removed (None) on top of this process's environment."""


@dataclass(frozen=True)
class Outcome:
    """What a launch did: exit status, output (stdout and stderr), seconds, whether ``timeout``
    stopped it (status 124, or 137 after its SIGKILL, at the time limit), and the lm loss of
    every iteration its trainer's ``--report`` holds."""

    status: int
    output: str
    seconds: float
    hung: bool
    losses: tuple[float, ...] = ()


def schedule_arguments(schedule: str) -> list[str]:
    """The PP=2 arguments of ``schedule`` (interleaved-1f1b takes two chunks per rank)."""
    virtual = ["--virtual-pipeline-model-parallel-size", "2"] if schedule == "interleaved-1f1b" else []
    return ["--pipeline-model-parallel-size", "2", *virtual, "--pipeline-schedule", schedule]


def reference_run() -> Run:
    """PP=1: megatron-core's forward_backward_no_pipelining in one process."""
    command = (sys.executable, "-m", "megatron_bitpipe.train", *MODEL, "--pipeline-schedule", "none")
    return Run("PP=1 reference (--pipeline-schedule none)", command)


def two_rank_run(schedule: str, connections: str, *, cpu: bool) -> Run:
    """``schedule`` at PP=2, both ranks on device 0 (``LOCAL_RANK=0``), under torchrun.

    ``connections`` is CUDA_DEVICE_MAX_CONNECTIONS (``default``: removed from the environment).
    ``cpu`` leaves NCCL's settings out (gloo ignores them).
    """
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")
    trainer = ("--no-python", "env", "LOCAL_RANK=0", sys.executable, "-m", "megatron_bitpipe.train")
    command = (*torchrun, *trainer, *MODEL, *schedule_arguments(schedule))
    environment: dict[str, str | None] = {} if cpu else dict(MULTI_RANK_ENVIRONMENT)
    environment["CUDA_DEVICE_MAX_CONNECTIONS"] = None if connections == "default" else connections
    setting = "unset" if connections == "default" else connections
    place = "the CPU (gloo)" if cpu else "GPU 0"
    return Run(f"{schedule} PP=2, 2 ranks on {place}, CUDA_DEVICE_MAX_CONNECTIONS={setting}", command, environment)


def launch(run: Run, timeout_s: int, *, cpu: bool, report: str | None = None) -> Outcome:
    """``timeout -k 30 TIMEOUT`` around the run's command (a trainer's, given ``--report report``
    when ``report`` is a path), in a session of its own.

    ``timeout`` signals its whole process group (torchrun and the ranks); whatever is left of that
    group afterwards is killed, so no rank outlives its run.
    """
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if cpu:
        environment["OMP_NUM_THREADS"] = "1"
    for name, value in run.environment.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    reporting = ["--report", report] if report is not None else []
    if report is not None and os.path.exists(report):
        os.remove(report)  # an earlier launch's report is never read as this one's
    command = ["timeout", "-k", "30", str(timeout_s), *run.command, *reporting]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    seconds = time.perf_counter() - started
    hung = process.returncode in (124, 137) and seconds >= timeout_s
    losses = reported_losses(report) if report is not None else []
    return Outcome(process.returncode, output, seconds, hung, tuple(losses))


def reported_losses(path: str) -> list[float]:
    """Every iteration's ``lm loss`` in the one-schedule trainer report at ``path`` (none if the
    trainer wrote none)."""
    try:
        entries = run_report.read(path)["schedules"]
    except run_report.ReportError:
        return []
    return run_report.losses(entries[0]) if entries else []


def verdict(run: Run, outcome: Outcome, reference: list[float], timeout_s: int, *, cpu: bool) -> tuple[bool, str]:
    """(passed, line without its PASS/FAIL word) of a two-rank run against the PP=1 losses."""
    tail = outcome.output[-1500:].replace("\n", " | ")
    if outcome.hung:
        return False, (f"{run.name}: hang: no exit within {timeout_s} s (NCCL_BUFFSIZE={NCCL_BUFFSIZE}, "
                       f"messages of {MESSAGE_BYTES} bytes); last output: {tail}")
    if outcome.status != 0:
        return False, f"{run.name}: exit {outcome.status}: {tail}"
    if not cpu and SHARED_GPU not in outcome.output:
        return False, f"{run.name}: NCCL's log does not say '{SHARED_GPU}': did the ranks share the GPU?"
    found = list(outcome.losses)
    worst = worst_relative(found, reference)
    return worst <= TOLERANCE, (
        f"{run.name}: lm loss equals PP=1's (worst relative {worst:.1e}, bound {TOLERANCE:g}, "
        f"{len(found)} of {TRAIN_ITERS} iterations, {outcome.seconds:.0f} s)"
    )


def shown(run: Run) -> str:
    """The run as one shell line: its environment changes, then its command."""
    removed = [f"-u {name}" for name, value in run.environment.items() if value is None]
    changes = [*removed, *(f"{name}={value}" for name, value in run.environment.items() if value is not None)]
    return " ".join(["env", *changes, *run.command]) if changes else " ".join(run.command)


def report_path(logs: str, index: int) -> str:
    """Where run ``index`` writes its ``--report``: ``logs``/NN.report.json."""
    return os.path.join(logs, f"{index:02d}.report.json")


def keep(logs: str | None, index: int, run: Run, outcome: Outcome) -> None:
    """The run's whole output in ``logs``/NN.log, after its command line."""
    if logs is None:
        return
    with open(os.path.join(logs, f"{index:02d}.log"), "w") as log_file:
        log_file.write(f"{run.name}\n{shown(run)}\nexit {outcome.status}, {outcome.seconds:.1f} s\n{outcome.output}")


def selected(text: str, choices: Sequence[str]) -> list[str]:
    """A non-empty comma list of ``choices``; an argparse error naming the strays otherwise."""
    chosen = [item for item in text.split(",") if item]
    unknown = [item for item in chosen if item not in choices]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{','.join(unknown) or 'nothing'} not in {','.join(choices)}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print every launch instead of running it")
    parser.add_argument("--cpu", action="store_true", help="run on CPU/gloo: tests the harness, not NCCL")
    parser.add_argument("--logs", help="keep every run's whole output and report in this folder")
    parser.add_argument("--schedules", default=",".join(SCHEDULES),
                        type=lambda text: selected(text, SCHEDULES))
    parser.add_argument("--connections", default=",".join(CONNECTIONS),
                        type=lambda text: selected(text, CONNECTIONS),
                        help="CUDA_DEVICE_MAX_CONNECTIONS values to run: 1, default (unset) or both")
    parser.add_argument("--timeout", type=int, default=300, help="seconds each launch may take (default 300)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or print) the reference and every two-rank launch; 1 if any FAIL, else 0."""
    options = build_parser().parse_args(argv)
    if MESSAGE_BYTES <= NCCL_BUFFSIZE:
        raise AssertionError(f"messages of {MESSAGE_BYTES} bytes fit NCCL_BUFFSIZE={NCCL_BUFFSIZE}")
    runs = [two_rank_run(schedule, connections, cpu=options.cpu)
            for schedule in options.schedules for connections in options.connections]
    print(f"gpu_multirank_check: {len(runs)} two-rank runs of {TRAIN_ITERS} iterations, "
          f"{GLOBAL_BATCH // MICRO_BATCH} microbatches; "
          f"each pipeline message {MESSAGE_BYTES} bytes = {MESSAGE_BYTES // NCCL_BUFFSIZE} x "
          f"NCCL_BUFFSIZE={NCCL_BUFFSIZE}: a send finishes only once its receive runs", flush=True)
    if options.dry_run:
        for run in [reference_run(), *runs]:
            print(f"DRY {run.name}: timeout -k 30 {options.timeout} {shown(run)}", flush=True)
        return 0
    if not options.cpu:
        import torch

        if not torch.cuda.is_available():
            print("SKIP every run: no CUDA device", flush=True)
            return 0
    logs = options.logs or tempfile.mkdtemp(prefix="gpu-multirank-")
    os.makedirs(logs, exist_ok=True)
    reference = reference_run()
    outcome = launch(reference, options.timeout, cpu=options.cpu, report=report_path(logs, 0))
    keep(logs, 0, reference, outcome)
    expected = list(outcome.losses)
    if outcome.status != 0 or len(expected) != TRAIN_ITERS:
        reason = "hang" if outcome.hung else f"exit {outcome.status}, {len(expected)} losses"
        print(f"FAIL {reference.name}: {reason}: {outcome.output[-1500:]}", flush=True)
        print(f"SKIP every two-rank run: no PP=1 losses to compare with (logs in {logs})", flush=True)
        return 1
    print(f"PASS {reference.name}: {TRAIN_ITERS} losses, {outcome.seconds:.0f} s", flush=True)
    failures = 0
    for index, run in enumerate(runs, start=1):
        outcome = launch(run, options.timeout, cpu=options.cpu, report=report_path(logs, index))
        keep(logs, index, run, outcome)
        passed, line = verdict(run, outcome, expected, options.timeout, cpu=options.cpu)
        failures += not passed
        print(f"{'PASS' if passed else 'FAIL'} {line}", flush=True)
    print(f"gpu_multirank_check: {failures} of {len(runs)} failed; every run's output in {logs}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
