"""Checkpoints with an ordinary Megatron GPT's keys, whatever the placement and schedule.

megatron-core's distributed checkpointing saves each ``ShardedTensor`` under its key (global
layer numbers, which our chunks already use) and expects exactly one *main* replica of every
shard (``replica_id`` all zeros) among all ranks. Two things our placements add break that:

* the bidirectional placements (Chimera, BitPipe) hold every stage twice: both copies would claim
  the main replica (``Invalid access pattern ... embedding.word_embeddings.weight``). The up
  pipeline's copy is marked a replica, so only the down copy writes and both read;
* a locally tied head (V, Chimera, BitPipe with shared embeddings) is an ``output_layer.weight``
  that an ordinary tied GPT does not have. It is stored as megatron stores a last stage's tied
  head: under the embedding's key, as a replica (``replica_id`` (1, 0, dp)), so it is loaded from
  the embedding and never written.

Both leave two tensors of one shard on one rank (a copy and its main replica). megatron's
fully-parallel save (``FullyParallelSaveStrategyWrapper``, Megatron-LM's default at data
parallel > 1) spreads the writes over the data-parallel ranks by marking, per shard, every local
tensor of the rank chosen to write it the main replica: both copies then claim it and the save
fails (``Invalid access pattern``). ``follow_placement`` therefore also installs, once per
process, ``_one_main_copy_per_shard`` around that marking: of several local tensors of a shard
it keeps as main only the one that was main before (the copy's twin), the others replicas.

The distributed optimizer's buckets (its ``dp_reshardable`` format, Megatron-LM's default) are
keyed by the rank's model-parallel index; the two replicas of a stage shard one optimizer state
over the pair, so ``share_optimizer_keys_with_replicas`` gives both the pair's index (else each
writes half of a bucket under its own key: ``Failed to validate global plan ... out of bounds
chunk``).

A checkpoint therefore loads under any other schedule, PP and placement, megatron's own included.
``follow_placement`` installs this on a chunk (``build_chunks`` calls it);
``save_checkpoint`` / ``load_checkpoint`` write and read one in Megatron-LM's layout
(``iter_0000010/`` and ``latest_checkpointed_iteration.txt``) for our trainer.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from multiprocessing.managers import SyncManager
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_bitpipe.runtime import faults
from megatron_bitpipe.schedules.placement import Placement

TRACKER = "latest_checkpointed_iteration.txt"
WORD_EMBEDDING_KEY = "embedding.word_embeddings.weight"
REPLICA_OFFSET = 2
"""Added to the first component of an up-pipeline copy's replica id (1 marks a tied head)."""


def follow_placement(model: Any, placement: Placement, *, tied_locally: bool) -> None:
    """Make ``model.sharded_state_dict()`` give an ordinary GPT's keys and one main copy."""
    _install_one_main_copy_per_shard()
    original = model.sharded_state_dict
    replica = placement.pipeline_of(model.bitpipe_stage) == 1

    def sharded_state_dict(
        prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        state = original(prefix, sharded_offsets, metadata)
        if tied_locally and model.post_process:
            _store_head_as_embedding(state, model, prefix)
        if replica:
            dict_list_map_inplace(_as_replica, state)
        return state

    model.sharded_state_dict = sharded_state_dict


def _store_head_as_embedding(state: dict[str, Any], model: Any, prefix: str) -> None:
    head_key = f"{prefix}output_layer.weight"
    if head_key not in state:
        return
    state[head_key] = make_tp_sharded_tensor_for_checkpoint(
        tensor=model.output_layer.weight,
        key=f"{prefix}{WORD_EMBEDDING_KEY}",
        replica_id=(1, 0, parallel_state.get_data_parallel_rank(with_context_parallel=True)),
        allow_shape_mismatch=True,
    )


def _as_replica(value: Any) -> Any:
    if isinstance(value, ShardedBase):
        replica_id = value.replica_id
        if isinstance(replica_id, int):
            value.replica_id = replica_id + REPLICA_OFFSET
        else:
            value.replica_id = (replica_id[0] + REPLICA_OFFSET, *replica_id[1:])
    return value


def share_optimizer_keys_with_replicas(optimizer: Any, placement: Placement) -> None:
    """Key the distributed optimizer's checkpoint buckets by the replica pair, not the rank.

    Both ranks of a pair take the index ``lower pipeline rank x TP + TP rank``, and the group the
    state is sharded over (the buffers' group, replica pair x data parallel: megatron-core 0.16
    keeps the data-parallel group alone, and writes overlapping shards). No-op without replicas.
    """
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    replica = placement.replica_of(placement.rank_stages[pp_rank][0])
    if replica is None:
        return
    partner = placement.rank_of(replica)
    index = min(pp_rank, partner) * parallel_state.get_tensor_model_parallel_world_size()
    index += parallel_state.get_tensor_model_parallel_rank()
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(inner, "data_parallel_group_idx"):
            continue
        inner.data_parallel_group_idx = index
        sharded_over = {id(b.data_parallel_group): b.data_parallel_group for b in inner.buffers}
        if len(sharded_over) != 1:
            raise RuntimeError(
                f"pipeline rank {pp_rank}: the distributed optimizer's buffers reduce over "
                f"{len(sharded_over)} groups; a replica pair's checkpoint needs one"
            )
        inner.data_parallel_group = next(iter(sharded_over.values()))


def _install_one_main_copy_per_shard() -> None:
    """Wrap megatron's fully-parallel save distribution once (idempotent)."""
    from megatron.core.dist_checkpointing.strategies import fully_parallel

    original = fully_parallel.distribute_main_replicas_with_precomputed_distribution
    if getattr(original, "bitpipe_one_main_copy", False):
        return

    def distribute(sharded_state_dict: Any, parallelization_group: Any, precomputed_distribution: Any) -> None:
        before = _local_shards(sharded_state_dict)
        copy_marks = [_copy_mark(shard.replica_id) for shard in before]
        original(sharded_state_dict, parallelization_group, precomputed_distribution)
        _one_main_copy_per_shard(before, copy_marks)

    distribute.bitpipe_one_main_copy = True  # type: ignore[attr-defined]
    fully_parallel.distribute_main_replicas_with_precomputed_distribution = distribute


def _local_shards(sharded_state_dict: Any) -> list[Any]:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return [value for value in nested_values(sharded_state_dict) if isinstance(value, ShardedTensor)]


def _copy_mark(replica_id: Any) -> int:
    """The first component of a replica id: 0 for a model's own tensor, 1 for a tied head kept
    under the embedding's key, ``REPLICA_OFFSET`` and up for an up-pipeline copy."""
    return replica_id if isinstance(replica_id, int) else replica_id[0]


def _one_main_copy_per_shard(shards: list[Any], copy_marks: list[int]) -> None:
    """Of this rank's tensors of one shard marked main, keep one: the one with the lowest copy
    mark before the distribution (the copies' original); the rest become replicas (id 1)."""
    from megatron.core.dist_checkpointing.utils import _sharded_tensor_shard_id

    by_shard: dict[Any, list[int]] = {}
    for index, shard in enumerate(shards):
        if shard.replica_id == 0:
            by_shard.setdefault(_sharded_tensor_shard_id(shard), []).append(index)
    for indices in by_shard.values():
        if len(indices) > 1:
            keep = min(indices, key=lambda index: copy_marks[index])
            for index in indices:
                if index != keep:
                    shards[index].replica_id = 1


def metadata() -> dict[str, Any]:
    """What Megatron-LM passes to ``sharded_state_dict`` (checkpointing.py:401), with the
    distributed optimizer's state saved fully reshardable (its DP-reshardable default cannot
    follow a change of pipeline layout)."""
    return {
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": False,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def model_state_dict(model: list[Any]) -> dict[str, Any]:
    """Megatron-LM's layout: ``model`` for one chunk, ``model0``, ``model1``, ... for several,
    each the unwrapped GPTModel's state (as Megatron-LM's checkpointing unwraps DDP and
    Float16Module)."""
    if len(model) == 1:
        return {"model": _inner(model[0]).sharded_state_dict(metadata=metadata())}
    return {
        f"model{index}": _inner(chunk).sharded_state_dict(metadata=metadata())
        for index, chunk in enumerate(model)
    }


def _inner(chunk: Any) -> Any:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def iteration_folder(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def save_checkpoint(root: str, iteration: int, model: list[Any], optimizer: Any) -> str:
    """Save model and optimizer (torch_dist format) under ``root``; collective. Returns the folder.

    The tracker file is written last, by rank 0, once every rank has finished: a checkpoint cut
    short is never the one ``load_checkpoint`` picks.
    """
    folder = iteration_folder(root, iteration)
    if torch.distributed.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    torch.distributed.barrier()
    state = model_state_dict(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata())
    state["iteration"] = iteration
    _writers_die_with_this_process()
    dist_checkpointing.save(state, folder, sharded_strategy=_save_strategy())
    faults.trigger("save", rank=torch.distributed.get_rank(), iteration=iteration)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, TRACKER), "w", encoding="utf-8") as handle:
            handle.write(str(iteration))
    return folder


def _save_strategy() -> Any:
    """Megatron-LM's default (``--ckpt-fully-parallel-save``): the writes spread over the
    data-parallel ranks when there are several; else megatron-core's default strategy."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if group.size() <= 1:
        return None
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


_MANAGERS: list[Any] = []


def _writers_die_with_this_process() -> None:
    """Start megatron-core's checkpoint-writer queue in a server that dies with this process.

    megatron-core 0.16 keeps the results of its writers in a ``multiprocessing`` Manager it
    starts once, at the first save (``filesystem_async._results_queue``). A rank killed with
    SIGKILL leaves that server running, holding the job's output open. The same queue is made
    here, first, by a server that asks Linux to kill it when its parent dies.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "missing") is not None or _MANAGERS:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(_die_with_parent)
    _MANAGERS.append(manager)
    filesystem_async._results_queue = manager.Queue()


def _die_with_parent() -> None:
    """In a child: SIGKILL it when the parent dies (Linux ``PR_SET_PDEATHSIG``; no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def latest_iteration(root: str) -> int | None:
    """The iteration the tracker names, or None when ``root`` holds no finished checkpoint."""
    try:
        with open(os.path.join(root, TRACKER), encoding="utf-8") as handle:
            return int(handle.read().strip())
    except FileNotFoundError:
        return None


def load_checkpoint(root: str, model: list[Any], optimizer: Any) -> int:
    """Load the latest checkpoint under ``root`` into model and optimizer; return its iteration."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"--load {root}: no {TRACKER}; nothing was saved there")
    state = model_state_dict(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=metadata())
    loaded = dist_checkpointing.load(state, iteration_folder(root, iteration))
    if len(model) == 1:
        _inner(model[0]).load_state_dict(loaded["model"])
    else:
        for index, chunk in enumerate(model):
            _inner(chunk).load_state_dict(loaded[f"model{index}"])
    optimizer.load_state_dict(loaded["optimizer"])
    return iteration
