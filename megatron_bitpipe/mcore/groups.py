"""Gradient groups: which ranks average the gradients of a stage.

Single-pipeline placements: the ordinary data-parallel group. Bidirectional placements (Chimera,
BitPipe): every stage lives on pipeline rank ``r`` and on its partner (``D-1-r``), so the group is
that replica pair times the data-parallel ranks of both. Groups are
created with ``new_group`` in one sorted order on every rank, with the run's timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from megatron_bitpipe.mcore import compat
from megatron_bitpipe.mcore.model import global_parameter_names, unwrap
from megatron_bitpipe.runtime.channels import default_group_timeout
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


def create_gradient_groups(
    placement: Placement, *, timeout: timedelta | None = None
) -> GradientGroups:
    """Build (collectively, on every rank) the gradient groups of ``placement``.

    New groups get ``timeout`` (default: the default group's, i.e. the run's); a single
    pipeline uses megatron's data-parallel group, which has the run's timeout already.
    """
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
    timeout = timeout or default_group_timeout()
    for ranks in groups:
        group = dist.new_group(list(ranks), timeout=timeout)
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

    With replicas, the reduction over (replica pair x data parallel) must sum over the pair
    and average over data parallel: each replica's gradient covers its own microbatches, with
    the loss divided by all N. DDP divides by the whole group, so its factor is multiplied by
    the number of replicas (``sums_replicas``), and the loss keeps megatron's scale: fp16 sees
    the same gradient magnitudes, and so the same overflows, as one process.
    """
    replicated = groups.num_replicas > 1
    collection = groups.ddp_collection() if replicated else None
    wrapped = []
    for index, chunk in enumerate(chunks):
        ddp = DistributedDataParallel(
            config,
            ddp_config,
            chunk,
            disable_bucketing=replicated or index > 0,
            pg_collection=collection,
        )
        ddp.bitpipe_groups = groups
        if replicated:
            compat.scale_gradient_reduction(ddp, groups.num_replicas)
        ddp.sums_replicas = replicated
        wrapped.append(ddp)
    return wrapped


def mark_replica_duplicates(
    model: list[torch.nn.Module], placement: Placement, *, distributed_optimizer: bool
) -> None:
    """Count each stage once in megatron's gradient norm (and zero count) with two replicas.

    The plain optimizer reduces the norm over the model-parallel group, which holds both copies
    of every stage: each would count twice and clipping at c would act like c / sqrt(2). The up
    pipeline's parameters are marked ``shared`` (megatron's mark for a duplicate, the one its own
    tied output layer carries), so only the down copy counts. The distributed optimizer needs no
    mark: it shards each stage over the gradient group (replica pair x data parallel), so the
    shards of the two copies together hold every element once. Call before building the optimizer.
    """
    if placement.num_pipelines == 1 or distributed_optimizer:
        return
    for chunk in model:
        if placement.pipeline_of(_stage_of(chunk)) == 1:
            for param in chunk.parameters():
                param.shared = True


def parameter_checksums(chunk: torch.nn.Module) -> torch.Tensor:
    """Two int64 checksums per parameter, on the parameter's device: no copy of the chunk.

    Column 0 sums the parameter's bit patterns as integers (wrapping), so any single changed
    element changes it; column 1 holds the bits of the float64 sum of squares.
    """
    rows = []
    for param in chunk.parameters():
        data = param.detach()
        bits = data.view(_INTEGER_OF_SIZE[data.element_size()])
        squares = torch.linalg.vector_norm(data, dtype=torch.float64).square()
        rows.append(torch.stack([bits.sum(dtype=torch.int64), squares.view(torch.int64)]))
    return torch.stack(rows)


_INTEGER_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def assert_replicas_identical(model: list[torch.nn.Module], groups: GradientGroups) -> None:
    """Raise unless every member of each gradient group holds bitwise-equal parameters.

    Compares per-parameter checksums (``parameter_checksums``), not copies of the weights.
    Chunks are visited by their stage's position in its pipeline, an order both replicas share.
    """
    if len(groups.ranks) == 1:
        return
    placement = groups.placement
    by_position = sorted(model, key=lambda chunk: placement.position(_stage_of(chunk)))
    for chunk in by_position:
        checksums = parameter_checksums(chunk)
        highest, lowest = checksums.clone(), checksums.clone()
        dist.all_reduce(highest, op=dist.ReduceOp.MAX, group=groups.group)
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=groups.group)
        differs = (highest != lowest).any(dim=1)
        if bool(differs.any()):
            names = global_parameter_names(unwrap(chunk))
            local = [name for name, _ in unwrap(chunk).named_parameters()]
            first = int(differs.nonzero()[0])
            raise AssertionError(
                f"stage {_stage_of(chunk)}: parameter {names[local[first]]} (and "
                f"{int(differs.sum()) - 1} more) differs between the ranks {list(groups.ranks)} "
                f"that hold copies of it"
            )


def _stage_of(chunk: torch.nn.Module) -> int:
    return unwrap(chunk).bitpipe_stage
