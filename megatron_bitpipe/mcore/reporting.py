"""What the trainer prints and writes: Megatron-LM's log lines, per-rank figures, the trace.

Lines are printed by the last global rank, as Megatron-LM's ``print_rank_last`` does.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megatron_bitpipe.schedules import Action, render
from megatron_bitpipe.schedules.placement import Placement
from megatron_bitpipe.schedules.simulate import Event

logger = logging.getLogger("megatron_bitpipe.train")


@dataclass(frozen=True)
class IterationReport:
    """One iteration as Megatron-LM logs it."""

    iteration: int
    train_iters: int
    global_batch_size: int
    elapsed_ms: float
    learning_rate: float
    loss: float | None
    loss_scale: float
    grad_norm: float | None
    skipped: bool
    nan: bool = False
    """The step's loss or a gradient was not finite (the update was skipped)."""

    def record(self) -> dict[str, Any]:
        """This iteration as ``--report`` holds it (``megatron_bitpipe.run_report``)."""
        return {
            "iteration": self.iteration,
            "lm_loss": self.loss,
            "grad_norm": self.grad_norm,
            "elapsed_ms": self.elapsed_ms,
            "learning_rate": self.learning_rate,
            "loss_scale": self.loss_scale,
            "skipped": self.skipped,
            "nan": self.nan,
        }

    def line(self) -> str:
        """Megatron-LM's training log line (log interval 1)."""
        text = f" [{time.strftime('%Y-%m-%d %H:%M:%S')}]"
        text += f" iteration {self.iteration:8d}/{self.train_iters:8d} |"
        text += f" consumed samples: {self.iteration * self.global_batch_size:12d} |"
        text += f" elapsed time per iteration (ms): {self.elapsed_ms:.1f} |"
        text += f" learning rate: {self.learning_rate:.6E} |"
        text += f" global batch size: {self.global_batch_size:5d} |"
        if self.loss is not None:
            text += f" lm loss: {self.loss:.6E} |"
        text += f" loss scale: {self.loss_scale:.1f} |"
        if self.grad_norm is not None:
            text += f" grad norm: {self.grad_norm:.6E} |"
        text += f" number of skipped iterations: {int(self.skipped):3d} |"
        text += f" number of nan iterations: {int(self.nan):3d} |"
        return text


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO if is_logging_rank() else logging.WARNING)


def is_logging_rank() -> bool:
    """Megatron-LM's print_rank_last: the last global rank (last pipeline stage)."""
    return dist.get_rank() == dist.get_world_size() - 1


def log(line: str) -> None:
    if is_logging_rank():
        logger.info(line)


def per_rank(value: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """``value`` from every rank of ``group`` (set-up and reporting only: a host sync)."""
    size = dist.get_world_size(group)
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, value, group=group)
    return everyone


def write_trace(path: str, spans: list[tuple[str, float, float]], name: str, placement: Placement) -> None:
    """Every rank's measured spans (``(action, start s, end s)``, one track per global rank),
    written by rank 0 as Chrome trace JSON to ``path`` and, with matplotlib, a timeline PNG."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.gather_object(spans, everyone if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() != 0:
        return
    events = [
        Event(rank, Action.parse(action), start, end)
        for rank, part in enumerate(everyone)
        for action, start, end in part
    ]
    render.write_chrome_trace(path, events, name=name, placement=placement, time_unit=render.SECONDS)
    in_ms = [Event(e.rank, e.action, e.start * 1e3, e.end * 1e3) for e in events]
    try:
        render.plot_png(
            render.measured_result(name, in_ms),
            os.path.splitext(path)[0] + ".png",
            title=f"{name}, ms",
            placement=placement,
        )
    except ImportError as error:
        logger.warning("no timeline PNG: %s", error)
