"""Running the trainer and Megatron-LM in subprocesses, and reading what they report.

Our trainer's figures come from its ``--report`` (``train``); Megatron-LM's ``pretrain_gpt.py``
has only its log line, read by ``megatron_bitpipe.megatron_lm.log`` (``logged_losses``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_bitpipe import run_report
from megatron_bitpipe.megatron_lm import log as megatron_log

REPO = Path(__file__).resolve().parents[1]


def run(
    processes: int,
    target: list[str],
    *,
    pythonpath: list[str] = (),
    env: dict[str, str] | None = None,
    timeout: int = 420,
    torchrun: bool = False,
) -> subprocess.CompletedProcess:
    """``python [-m torch.distributed.run ...] TARGET``; ``target`` is ``["-m", module, ...]`` or
    ``[script, ...]``. torchrun for several processes (or when asked). CPU, one thread per
    process, warnings off."""
    command = [sys.executable]
    if processes > 1 or torchrun:
        command += f"-m torch.distributed.run --standalone --nproc-per-node={processes}".split()
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*pythonpath, str(REPO)]),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    return subprocess.run(
        [*command, *target], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout
    )


def succeeded(result: subprocess.CompletedProcess) -> str:
    """The run's stdout; fail the test with the tail of its output if it did not exit 0."""
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result.stdout


@dataclass(frozen=True)
class Trained:
    """One launch of our trainer: how it ended, and its ``--report`` (None if it wrote none)."""

    result: subprocess.CompletedProcess
    report: dict[str, Any] | None

    @property
    def log(self) -> str:
        return self.result.stdout

    @property
    def schedules(self) -> dict[str, dict[str, Any]]:
        """The report's entry of each schedule, in the order they trained."""
        return run_report.by_schedule(self.report) if self.report is not None else {}

    @property
    def only(self) -> dict[str, Any]:
        """The entry of a launch that trained one schedule."""
        (entry,) = self.schedules.values()
        return entry


def train(
    processes: int,
    arguments: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: int = 420,
    check: bool = True,
) -> Trained:
    """``megatron_bitpipe.train ARGUMENTS --report FILE`` (``run``) with FILE in a temporary
    folder; with ``check``, fail the test unless it exits 0 and reports every schedule done."""
    with tempfile.TemporaryDirectory(prefix="report-") as folder:
        path = os.path.join(folder, "report.json")
        target = ["-m", "megatron_bitpipe.train", *arguments, "--report", path]
        result = run(processes, target, env=env, timeout=timeout)
        report = run_report.read(path) if os.path.exists(path) else None
    if check:
        succeeded(result)
        assert report is not None and report["complete"], report
    return Trained(result, report)


def logged_losses(log: str) -> list[float]:
    """The lm loss Megatron-LM's log line prints for every iteration (not NAN)."""
    return megatron_log.losses(log)


def logged_grad_norms(log: str) -> list[float]:
    """megatron's gradient norm of every iteration that updated (clipping uses it)."""
    return megatron_log.grad_norms(log)
