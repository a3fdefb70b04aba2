"""Executor overhead: megatron-core's own schedule functions against the same order run by ours.

Trains the same small GPT with ``megatron-1f1b`` then ``1f1b`` (and ``megatron-interleaved`` then
``interleaved-1f1b`` with vp 2) in one process group on local CPU processes, and prints the median
step time of each (the first two iterations are warm-up) and the ratio ours / megatron's.

    python scripts/bench_executor.py [--pp 2] [--iters 12] [--hidden-size 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from megatron_bitpipe import run_report  # noqa: E402

PAIRS = (("megatron-1f1b", "1f1b"), ("megatron-interleaved", "interleaved-1f1b"))


def step_times(report_path: str) -> dict[str, list[float]]:
    """Milliseconds per iteration of each schedule of a trainer's ``--report``."""
    entries = run_report.by_schedule(run_report.read(report_path))
    return {name: run_report.step_ms(entry) for name, entry in entries.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    args = parser.parse_args()
    schedules = [name for pair in PAIRS for name in pair]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.pp}",
        "-m", "megatron_bitpipe.train", "--pipeline-model-parallel-size", str(args.pp),
        "--virtual-pipeline-model-parallel-size", "2", "--pipeline-schedule", ",".join(schedules),
        "--num-layers", str(4 * args.pp), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", "8", "--seq-length", "128", "--vocab-size", "1024",
        "--micro-batch-size", "2", "--global-batch-size", str(16 * args.pp), "--train-iters", str(args.iters),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as folder:
        report = os.path.join(folder, "report.json")
        result = subprocess.run([*command, "--report", report], cwd=REPO, env=env, capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            sys.exit(result.stdout[-3000:] + result.stderr[-3000:])
        times = step_times(report)
    print(f"PP={args.pp}, hidden {args.hidden_size}, {args.iters} iterations (median of 3..{args.iters}), ms per step")
    for theirs, ours in PAIRS:
        theirs_ms, ours_ms = (statistics.median(times[name][2:]) for name in (theirs, ours))
        print(f"{theirs:<22}{theirs_ms:9.1f}   {ours:<18}{ours_ms:9.1f}   ours / megatron {ours_ms / theirs_ms:6.3f}")


if __name__ == "__main__":
    main()
