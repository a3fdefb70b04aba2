"""megatron-core version shims (0.16.1 .. 0.19.x): one function per API that moved.

Each shim inspects the installed signature instead of comparing version numbers, so a point
release that back-ports a change still works.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from megatron.core.pipeline_parallel import schedules
from megatron.core.utils import get_model_type

SUPPORTED = ((0, 16), (0, 19))
"""Oldest and newest (major, minor) this package is tested against."""


def version() -> tuple[int, int, int]:
    """The installed megatron-core version as (major, minor, patch)."""
    from megatron.core import package_info

    major, minor, patch = package_info.VERSION[:3]
    return int(major), int(minor), int(patch)


def check_version() -> None:
    """Raise a clear error when the installed megatron-core is outside the supported range."""
    major_minor = version()[:2]
    low, high = SUPPORTED
    if not low <= major_minor <= high:
        found = ".".join(map(str, version()))
        raise RuntimeError(
            f"megatron-core {found} is not supported: megatron_bitpipe needs "
            f"{low[0]}.{low[1]} <= megatron-core < {high[0]}.{high[1] + 1}"
        )


_BACKWARD_TAKES_MODEL_TYPE = "model_type" in inspect.signature(schedules.backward_step).parameters


def backward_step(
    model: torch.nn.Module,
    input_tensor: torch.Tensor | None,
    output_tensor: torch.Tensor,
    output_tensor_grad: torch.Tensor | None,
    config: Any,
) -> torch.Tensor | None:
    """``schedules.backward_step``; 0.19 dropped its ``model_type`` argument."""
    if _BACKWARD_TAKES_MODEL_TYPE:
        return schedules.backward_step(
            input_tensor, output_tensor, output_tensor_grad, get_model_type(model), config
        )
    return schedules.backward_step(input_tensor, output_tensor, output_tensor_grad, config)


def get_forward_backward_func_parameters() -> tuple[str, ...]:
    """Names ``get_forward_backward_func`` accepts (0.19 added ``schedule_pg_collection``)."""
    return tuple(inspect.signature(schedules.get_forward_backward_func).parameters)


def scale_gradient_reduction(ddp: Any, factor: float) -> None:
    """Multiply the factor megatron's DDP applies to gradients before reducing them.

    0.16-0.19 keep it on every bucket (``bucket.gradient_scaling_factor``, applied in
    ``start_grad_sync`` before the all-reduce / reduce-scatter) and on its buffer (``buffers``
    and ``expert_parallel_buffers``), from where later buckets would copy it.
    """
    buffers = [*getattr(ddp, "buffers", ()), *getattr(ddp, "expert_parallel_buffers", ())]
    buckets = [bucket for buffer in buffers for bucket in getattr(buffer, "buckets", ())]
    if not buckets or not all(hasattr(b, "gradient_scaling_factor") for b in buckets):
        found = ".".join(map(str, version()))
        raise RuntimeError(
            f"megatron-core {found}: DistributedDataParallel keeps no per-bucket "
            f"gradient_scaling_factor; megatron_bitpipe cannot make it sum over the replicas"
        )
    for buffer in buffers:
        buffer.gradient_scaling_factor *= factor
    for bucket in buckets:
        bucket.gradient_scaling_factor *= factor
