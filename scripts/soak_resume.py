"""Soak: a long BitPipe run killed mid-way resumes from its last checkpoint, bit for bit.

    .venv/bin/python scripts/soak_resume.py [--iterations 200] [--save-interval 50] [--kill-at 120]

Trains a small GPT with bitpipe on 4 local CPU processes (torchrun, gloo) for ``--iterations``
iterations, checkpointing every ``--save-interval``, once uninterrupted and once with rank 2
killed (SIGKILL) as its step ``--kill-at`` starts, then restarted from the last checkpoint.
Prints both loss curves' comparison and exits 1 unless the resumed curve equals the uninterrupted
one bitwise (the losses are read from each launch's ``--report``, in full precision; the killed
launch's report holds the iterations it logged before the kill).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from megatron_bitpipe import run_report  # noqa: E402

MODEL = (
    "--num-layers 8 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --vocab-size 128 "
    "--micro-batch-size 2 --global-batch-size 16 --lr 1e-3 --seed 1234 "
    "--pipeline-model-parallel-size 4 --pipeline-schedule bitpipe"
).split()


def train(arguments: list[str], fault: str | None = None) -> tuple[int, dict[int, float], float]:
    """(exit status, {iteration: lm loss} from its report, seconds) of one torchrun launch."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if fault:
        env["MEGATRON_BITPIPE_FAULT"] = fault
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "report.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                   "-m", "megatron_bitpipe.train", *MODEL, *arguments, "--report", report]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        try:
            entry = run_report.read(report)["schedules"][0]
        except (run_report.ReportError, IndexError):
            return result.returncode, {}, seconds
    return result.returncode, run_report.by_iteration(entry, "lm_loss"), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--save-interval", type=int, default=50)
    parser.add_argument("--kill-at", type=int, default=120)
    args = parser.parse_args()
    common = ["--train-iters", str(args.iterations)]
    status, reference, seconds = train(common)
    print(f"uninterrupted: {len(reference)} iterations in {seconds:.0f} s (exit {status})")
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = ["--save", folder, "--save-interval", str(args.save_interval)]
        status, before, seconds = train(
            common + checkpoints, fault=f"kill@step:rank=2:iteration={args.kill_at}"
        )
        resumed_from = int(Path(folder, "latest_checkpointed_iteration.txt").read_text())
        print(f"killed at iteration {args.kill_at} (exit {status}) after {seconds:.0f} s; "
              f"last checkpoint: iteration {resumed_from}")
        status, after, seconds = train(common + checkpoints + ["--load", folder])
        print(f"resumed: iterations {min(after)}-{max(after)} in {seconds:.0f} s (exit {status})")
    curve = {**{i: loss for i, loss in before.items() if i <= resumed_from}, **after}
    differing = [i for i in reference if curve.get(i) != reference[i]]
    print(f"loss curve: {len(reference)} iterations, {len(differing)} differ from the uninterrupted run"
          + (f" (first: iteration {differing[0]}: {curve.get(differing[0])} vs {reference[differing[0]]})"
             if differing else " (bitwise equal)"))
    return 1 if differing or len(curve) != len(reference) else 0


if __name__ == "__main__":
    sys.exit(main())
