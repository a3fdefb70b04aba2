"""Running the trainer and Megatron-LM in subprocesses, and reading their Megatron-style logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.* lm loss: ([0-9.E+-]+) \|")
GRAD_NORM = re.compile(r"iteration\s+\d+/\s*\d+ \|.* grad norm: ([0-9.E+-]+) \|")
SKIPPED = re.compile(r"number of skipped iterations:\s+(\d+) \|")
PEAK = re.compile(r"peak activation memory per rank \(bytes\): (\[.*?\])")
HELD = re.compile(r"of which sends not yet known complete, per rank \(bytes\): (\[.*?\])")


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


def sections(log: str) -> dict[str, str]:
    """The log split at the ``schedule NAME`` lines a multi-schedule launch prints."""
    parts = re.split(r"^schedule (\S+)$", log, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def logged_losses(log: str) -> list[float]:
    return [float(value) for _, value in LOSS.findall(log)]


def logged_grad_norms(log: str) -> list[float]:
    """megatron's gradient norm of every iteration that updated (clipping uses it)."""
    return [float(value) for value in GRAD_NORM.findall(log)]


def logged_list(pattern: re.Pattern, log: str) -> list[int]:
    """The per-rank list a log line holds, e.g. ``[1257428, 948176, 650188, 351216]``."""
    match = pattern.search(log)
    assert match is not None, pattern.pattern
    return json.loads(match.group(1))
