"""The step's loss dicts, brought to the ranks megatron reads them on, with one all-reduce.

megatron's training loop logs what the last pipeline rank returns. When the loss heads live
elsewhere (V shape: rank 0) or on two ranks (Chimera, BitPipe), every rank writes the values of
the microbatches it computed into row ``m`` of one zero ``(N, width)`` float64 tensor on the
compute device, and one all-reduce over the pipeline group sums the rows: each microbatch is
computed by exactly one rank, so the sum is that rank's value, exactly. The dicts are rebuilt as
views of the result, so no value leaves the device and the host never waits.

The layout (keys, shapes, dtypes) of a loss dict is learnt once per (schedule, N, phase) from the
loss ranks (one ``all_gather_object``, the only host sync, in the first step) and checked on
every later step. Values that are not tensors, and ``collect_non_loss_data``, take the object
gather instead (evaluation paths, not the training step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable

import torch
import torch.distributed as dist

from megatron_bitpipe.schedules.placement import Placement


@dataclass(frozen=True)
class LossLayout:
    """Keys, shapes and dtypes of one microbatch's loss dict, flattened into one row."""

    fields: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @classmethod
    def of(cls, item: Any) -> LossLayout | None:
        """The layout of a loss dict of tensors; None for anything else."""
        if not isinstance(item, dict) or not all(isinstance(v, torch.Tensor) for v in item.values()):
            return None
        return cls(tuple((key, tuple(value.shape), value.dtype) for key, value in item.items()))

    @property
    def width(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.fields)

    def flatten(self, item: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([item[key].detach().reshape(-1).to(torch.float64) for key, _, _ in self.fields])

    def unflatten(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        values, offset = {}, 0
        for key, shape, dtype in self.fields:
            size = math.prod(shape)
            values[key] = row[offset : offset + size].view(shape).to(dtype)
            offset += size
        return values


_LAYOUTS: dict[Hashable, LossLayout | None] = {}


def reduce_losses(
    outputs: list[tuple[int, Any]],
    placement: Placement,
    pp_rank: int,
    pp_group: dist.ProcessGroup,
    *,
    num_microbatches: int,
    device: torch.device,
    cache_key: Hashable,
    collect_non_loss_data: bool = False,
) -> list[Any]:
    """All N loss dicts in microbatch order on the loss ranks and the last pipeline rank.

    ``outputs`` holds this rank's ``(microbatch, loss dict)`` pairs. Other ranks get [].
    Collective over the pipeline group when the loss ranks are not just the last rank.
    """
    heads = placement.loss_ranks()
    last_rank = placement.num_ranks - 1
    if heads != {last_rank}:
        layout = None if collect_non_loss_data else _layout(outputs, pp_group, cache_key)
        if layout is None:
            outputs = _gather_objects(outputs, pp_group)
        else:
            outputs = _reduce_rows(outputs, layout, pp_group, num_microbatches, device)
    if pp_rank not in heads | {last_rank}:
        return []
    return [item for _, item in sorted(outputs, key=lambda pair: pair[0])]


def _layout(outputs: list[tuple[int, Any]], pp_group: dist.ProcessGroup, key: Hashable) -> LossLayout | None:
    if key not in _LAYOUTS:
        layouts = {LossLayout.of(item) for _, item in outputs}
        mine = layouts.pop() if len(layouts) == 1 else (None if layouts else "none")
        everyone: list[Any] = [None] * pp_group.size()
        dist.all_gather_object(everyone, mine, group=pp_group)
        found = {layout for layout in everyone if layout != "none"}
        _LAYOUTS[key] = found.pop() if len(found) == 1 else None
    layout = _LAYOUTS[key]
    if layout is not None:
        for microbatch, item in outputs:
            if LossLayout.of(item) != layout:
                raise ValueError(
                    f"the loss dict of microbatch {microbatch} is {_describe(item)}, but the first "
                    f"step's was {_describe_layout(layout)}; a loss function must return one layout"
                )
    return layout


def _reduce_rows(
    outputs: list[tuple[int, Any]],
    layout: LossLayout,
    pp_group: dist.ProcessGroup,
    num_microbatches: int,
    device: torch.device,
) -> list[tuple[int, Any]]:
    rows = torch.zeros((num_microbatches, layout.width), dtype=torch.float64, device=device)
    for microbatch, item in outputs:
        rows[microbatch] = layout.flatten(item)
    dist.all_reduce(rows, group=pp_group)
    return [(microbatch, layout.unflatten(rows[microbatch])) for microbatch in range(num_microbatches)]


def _gather_objects(outputs: list[tuple[int, Any]], pp_group: dist.ProcessGroup) -> list[tuple[int, Any]]:
    everyone: list[Any] = [None] * pp_group.size()
    dist.all_gather_object(everyone, outputs, group=pp_group)
    return [pair for part in everyone for pair in part]


def _describe(item: Any) -> str:
    layout = LossLayout.of(item)
    return type(item).__name__ if layout is None else _describe_layout(layout)


def _describe_layout(layout: LossLayout) -> str:
    return "{" + ", ".join(f"{key}: {list(shape)} {dtype}" for key, shape, dtype in layout.fields) + "}"
