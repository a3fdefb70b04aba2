"""What keeps a training run honest between its steps: deadlines, non-finite values, replicas.

* ``step_phase`` / ``optimizer_phase``: the ``Deadline`` phases of a step (restarted by every
  action the executor completes) and of the optimizer step, each naming what it waits on;
* ``all_finite`` / ``on_non_finite``: Megatron's handling of a NaN or Inf loss or gradient, one
  decision for every rank (both replicas, every data-parallel rank);
* ``check_replicas``: every copy of every stage bitwise equal (``--check-replicas-every``);
* ``perturb_if_planned``: the ``perturb@parameters`` test fault (``runtime.faults``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bitpipe.mcore import forward_backward
from megatron_bitpipe.mcore.cpu import compute_device
from megatron_bitpipe.mcore.groups import GradientGroups, assert_replicas_identical
from megatron_bitpipe.mcore.reporting import log
from megatron_bitpipe.runtime import faults
from megatron_bitpipe.runtime.deadline import Deadline


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss with --exit-on-nan, diverged replicas)."""


def step_phase(deadline: Deadline, iteration: int, seconds: float) -> Any:
    """The deadline of a step: ``seconds`` without an action completing."""

    def progress() -> object:
        executor = forward_backward.last_executor()
        return None if executor is None else (id(executor), executor.actions_done)

    def waiting() -> str | None:
        executor = forward_backward.last_executor()
        if executor is None or executor.current_action is None:
            return None
        message = executor.p2p.waiting_for if executor.p2p is not None else None
        action = f"action {executor.current_action}"
        return f"{message} in {action}" if message else action

    return deadline.phase(f"step {iteration}", seconds, progress=progress, waiting=waiting)


def optimizer_phase(deadline: Deadline, iteration: int, seconds: float) -> Any:
    """The deadline of an optimizer step; it waits on the ranks it reduces with."""
    return deadline.phase(
        f"optimizer step of iteration {iteration}",
        seconds,
        waiting=lambda: f"the optimizer's collectives with the other ranks {_peers()}",
    )


def _peers() -> list[int]:
    """The global ranks this rank's optimizer reduces with (model parallel and data parallel)."""
    groups = (
        parallel_state.get_model_parallel_group(),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )
    ranks = {rank for group in groups for rank in dist.get_process_group_ranks(group)}
    return sorted(ranks - {dist.get_rank()})


def all_finite(model: list[Any], loss: float | None, *, gradients: bool) -> bool:
    """Is every rank's loss (and, with ``gradients``, every gradient) finite?

    One decision for all ranks: a MIN all-reduce of each rank's verdict. With fp16 (no
    ``gradients``) an overflowing gradient is megatron's loss scaler's business: it skips the
    step itself and lowers the scale.
    """
    local = loss is None or math.isfinite(loss)
    if gradients:
        for chunk in model:
            for buffer in getattr(chunk, "buffers", ()):
                local = local and bool(torch.isfinite(buffer.grad_data).all())
    flag = torch.tensor([1.0 if local else 0.0], device=compute_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def on_non_finite(iteration: int, loss: float | None, *, stop: bool) -> None:
    """Megatron's behaviour: skip the update and count it, or stop (``--exit-on-nan``)."""
    what = f"lm loss {loss}" if loss is not None and not math.isfinite(loss) else "a gradient"
    where = f"iteration {iteration}: {what} is not finite"
    if stop:
        raise TrainingStopped(f"rank {dist.get_rank()}: {where}; stopping (--exit-on-nan)")
    log(f" {where}: the update is skipped on every rank")


def perturb_if_planned(model: list[Any], iteration: int) -> None:
    """The ``perturb@parameters`` test fault: nudge one parameter of this rank's first chunk."""
    if faults.planned("parameters", rank=dist.get_rank(), iteration=iteration) is not None:
        with torch.no_grad():
            next(model[0].parameters()).view(-1)[0] += 1e-3


def check_replicas(model: list[Any], groups: GradientGroups, iteration: int) -> None:
    """Every copy of every stage bitwise equal, or stop naming the stage and the parameter."""
    try:
        assert_replicas_identical(model, groups)
    except AssertionError as error:
        raise TrainingStopped(f"rank {dist.get_rank()}: iteration {iteration}: {error}") from error
    if len(groups.ranks) > 1:
        log(f" iteration {iteration}: the copies of every stage are bitwise identical")
