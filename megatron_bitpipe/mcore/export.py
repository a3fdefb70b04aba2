"""Unsplit parameters by global name, one copy per stage (the oracle's view of a model).

A tied head (a copy of the word embedding) is left out, as in a single-process tied model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bitpipe.mcore.model import OUTPUT_LAYER, global_parameter_names, unwrap
from megatron_bitpipe.schedules.placement import Placement


@torch.no_grad()
def full_parameters(
    model: list[torch.nn.Module], placement: Placement, *, tied: bool, gradients: bool = False
) -> dict[str, torch.Tensor]:
    """This rank's down-pipeline stages, unsplit over tensor parallel (collective over TP).

    With ``gradients`` the reduced gradients (DDP's ``main_grad``) instead of the values; they
    are whole only without a distributed optimizer. Only data- and tensor-parallel rank 0
    answers; other ranks return {} (identical copies, or shards it has joined).
    """
    if parallel_state.get_data_parallel_rank() != 0:
        return {}
    keep = parallel_state.get_tensor_model_parallel_rank() == 0
    result: dict[str, torch.Tensor] = {}
    for chunk in model:
        inner = unwrap(chunk)
        if placement.pipeline_of(inner.bitpipe_stage) != 0:
            continue
        names = global_parameter_names(inner)
        for local_name, param in inner.named_parameters():
            name = names[local_name]
            if tied and name == OUTPUT_LAYER:
                continue
            tensor = param.main_grad if gradients else param.data
            full = _unsplit(tensor, param)
            if keep:
                result[name] = full.detach().float().cpu().clone()
    return result


def _unsplit(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """``tensor`` (the parameter's data or gradient) with every tensor-parallel shard joined."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(tp_size)]
    dist.all_gather(
        shards, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = [torch.chunk(shard, stride, dim=dim) for shard in shards]
    return torch.cat(
        [pieces[rank][part] for part in range(stride) for rank in range(tp_size)], dim=dim
    )


def gather_to_first_rank(parameters: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Merge every rank's dict on global rank 0 (others get {}); names must not collide."""
    is_first = dist.get_rank() == 0
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.gather_object(parameters, everyone if is_first else None, dst=0)
    if not is_first:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for part in everyone:
        for name, tensor in part.items():
            if name in merged:
                raise RuntimeError(f"parameter {name} was exported by two ranks")
            merged[name] = tensor
    return merged
