"""Gradient groups: which ranks average the gradients of a stage.

Single-pipeline placements: the ordinary data-parallel group. Bidirectional placements (Chimera,
BitPipe): every stage lives on pipeline rank ``r`` and on its partner (``D-1-r``), so the group is
that replica pair times the data-parallel ranks of both (notes/bitpipe.md 1.2, 1.8). Groups are
created with ``new_group`` in one sorted order on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from megatron_bitpipe.mcore.model import unwrap
from megatron_bitpipe.schedules.placement import Placement


@dataclass(frozen=True)
class GradientGroups:
    """This rank's gradient group and the process-group collections megatron-core wants."""

    placement: Placement
    group: dist.ProcessGroup
    ranks: tuple[int, ...]

    @property
    def num_replicas(self) -> int:
        """Copies of each stage per data-parallel rank (2 for Chimera and BitPipe)."""
        return self.placement.num_pipelines

    def ddp_collection(self) -> ProcessGroupCollection:
        """Groups for megatron-core's DistributedDataParallel: reduce over the gradient group."""
        return ProcessGroupCollection(
            tp=parallel_state.get_tensor_model_parallel_group(),
            pp=parallel_state.get_pipeline_model_parallel_group(),
            ep=parallel_state.get_expert_model_parallel_group(),
            dp=self.group,
            dp_cp=self.group,
            # Passed explicitly: otherwise DDP calls new_group([rank]) on each rank alone.
            expt_dp=parallel_state.get_expert_data_parallel_group(),
        )


def replica_partner(placement: Placement, pp_rank: int) -> int:
    """The pipeline rank holding the other copy of every stage on ``pp_rank`` (itself if none)."""
    partners = set()
    for stage in placement.rank_stages[pp_rank]:
        replica = placement.replica_of(stage)
        partners.add(pp_rank if replica is None else placement.rank_of(replica))
    if len(partners) != 1:
        raise ValueError(
            f"placement {placement.kind}: the stages of pipeline rank {pp_rank} have replicas on "
            f"several ranks {sorted(partners)}; one partner rank is required"
        )
    return partners.pop()


def create_gradient_groups(placement: Placement) -> GradientGroups:
    """Build (collectively, on every rank) the gradient groups of ``placement``."""
    data_parallel = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if placement.num_pipelines == 1:
        return GradientGroups(
            placement, data_parallel, tuple(dist.get_process_group_ranks(data_parallel))
        )
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    partner = pp_ranks[replica_partner(placement, pp_rank)]
    mine = (tuple(dist.get_process_group_ranks(data_parallel)), partner)
    everyone: list[tuple[tuple[int, ...], int]] = [mine] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    data_parallel_of = {rank: ranks for ranks, _ in everyone for rank in ranks}
    groups = sorted(
        {
            tuple(sorted(set(ranks) | set(data_parallel_of[partner_rank])))
            for ranks, partner_rank in everyone
        }
    )
    own_rank = dist.get_rank()
    own = None
    for ranks in groups:
        group = dist.new_group(list(ranks))
        if own_rank in ranks:
            own = (group, ranks)
    assert own is not None
    return GradientGroups(placement, own[0], own[1])


def wrap_ddp(
    chunks: list[torch.nn.Module],
    config: TransformerConfig,
    ddp_config: DistributedDataParallelConfig,
    groups: GradientGroups,
) -> list[DistributedDataParallel]:
    """Wrap each chunk in megatron-core's DDP, reducing over its gradient group.

    As Megatron-LM does, only the first chunk is split into buckets. With replicas, no chunk
    is: the two copies of a stage must build identical buckets (same collectives), and DDP
    itself never splits chunks of pipeline ranks > 0.
    """
    replicated = groups.num_replicas > 1
    collection = groups.ddp_collection() if replicated else None
    return [
        DistributedDataParallel(
            config,
            ddp_config,
            chunk,
            disable_bucketing=replicated or index > 0,
            pg_collection=collection,
        )
        for index, chunk in enumerate(chunks)
    ]


@torch.no_grad()
def assert_replicas_identical(model: list[torch.nn.Module], groups: GradientGroups) -> None:
    """Raise unless every member of each gradient group holds bitwise-equal parameters.

    Chunks are visited by their stage's position in its pipeline, an order both replicas share.
    """
    if len(groups.ranks) == 1:
        return
    placement = groups.placement
    by_position = sorted(model, key=lambda chunk: placement.position(_stage_of(chunk)))
    for chunk in by_position:
        values = torch.cat([param.detach().reshape(-1).float() for param in chunk.parameters()])
        highest, lowest = values.clone(), values.clone()
        dist.all_reduce(highest, op=dist.ReduceOp.MAX, group=groups.group)
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=groups.group)
        if not torch.equal(highest, lowest):
            stage = _stage_of(chunk)
            raise AssertionError(
                f"stage {stage}: parameters differ between the ranks {list(groups.ranks)} that "
                f"hold copies of it (max abs diff {float((highest - lowest).abs().max()):.3e})"
            )


def _stage_of(chunk: torch.nn.Module) -> int:
    return unwrap(chunk).bitpipe_stage
