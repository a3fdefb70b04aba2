"""Every hook megatron_bitpipe puts into Megatron-LM, and the lines each one replaces.

Checked against Megatron-LM core_v0.16.1 (55ac708, megatron-core 0.16.1); line numbers are that
tag's. All are module attributes set before ``pretrain_gpt.py`` is imported (it imports several
by name); no Megatron-LM file is edited.

* ``pretrain``: ``megatron.training.pretrain`` (training.py:702, called by pretrain_gpt.py:342).
  Adds our ``extra_args_provider`` and the placement's embedding group (``get_embedding_ranks``,
  pretrain_gpt.py:314).
* ``get_forward_backward_func``: ``megatron.training.training.get_forward_backward_func``
  (training.py:156, called at :2607 and :3070). Our schedule (``mcore.install``).
* ``get_model``: ``megatron.training.training.get_model`` (training.py:1161, called at :1449).
  Our chunks: a V / BitPipe rank holds 2 or 4 chunks at placement-defined layers, and replicas
  need the replica-pair DDP groups.
* ``is_first_or_last_pipeline_stage``: ``megatron.training.utils`` (utils.py:434; used at
  pretrain_gpt.py:70 and :209). A V rank holds the first and the last stage: which chunk loads
  tokens and labels follows the placement.
* ``get_batch_on_this_tp_rank``: ``megatron.training.utils`` (utils.py:517; pretrain_gpt.py:75).
  With TP > 1 it broadcasts labels only on the last pipeline rank: every field is broadcast.
* ``get_megatron_optimizer``: ``megatron.training.training`` (training.py:128, called at :1463).
  Both replicas of a stage hand their parameters over in one order (stage position).
* grad norm: ``param.shared`` on the up replica (optimizer.py:136), so each stage counts once
  (``mcore.groups.mark_replica_duplicates``, inside ``get_model``).
* process groups: the gradient groups and our p2p channels take ``--distributed-timeout-minutes``
  as Megatron-LM's own groups do.
* gradient checks: ``--check-for-nan-in-loss-and-grad`` / ``--check-for-large-grads`` reach DDP's
  config as in Megatron-LM; our ``forward_backward_func`` runs them once per step after finalize
  (one host sync) instead of at every REDUCE_GRAD (``mcore.forward_backward.check_grads``).
* donated buffers: ``torch._functorch.config.donated_buffer`` off for schedules that split the
  backward, which run autograd twice over compiled fusions (bias-dropout); a study saw
  "compiled with non-empty donated buffers" there (not reproduced since).

megatron-core 0.17+ moved the model builder (``GPTModelBuilder.build_distributed_models``) and the
argument parsing (``pretrain_gpt.py: parse_and_validate_args``); those releases are refused with a
clear error until their hooks are written and checked.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any, Callable

import torch

from megatron_bitpipe.megatron_lm.arguments import add_arguments
from megatron_bitpipe.run_plan import RunPlan
from megatron_bitpipe.schedules.ir import Kind
from megatron_bitpipe.schedules.placement import Placement

CHECKED = ((0, 16),)
"""megatron-core (major, minor) releases these hooks were checked against."""


class UnsupportedMegatronLM(RuntimeError):
    """The installed Megatron-LM / megatron-core is not one the hooks were checked against."""


def check_version() -> None:
    from megatron_bitpipe.mcore import compat

    found = compat.version()
    if found[:2] not in CHECKED:
        raise UnsupportedMegatronLM(
            f"megatron-core {'.'.join(map(str, found))}: the Megatron-LM hooks are checked against "
            f"core_v0.16.x only (0.17+ build the GPT model through GPTModelBuilder and parse "
            f"arguments in pretrain_gpt.py); use Megatron-LM core_v0.16.1 with megatron-core 0.16.1"
        )


def install(run: RunPlan, *, tied_embeddings: bool) -> None:
    """Apply every hook for ``run`` (call before ``pretrain_gpt.py`` is imported)."""
    check_version()
    import megatron.training
    from megatron.training import training, utils

    placement = run.placement
    megatron.training.pretrain = _pretrain(megatron.training.pretrain, placement, tied_embeddings)
    training.get_model = functools.partial(get_model, run)
    utils.is_first_or_last_pipeline_stage = functools.partial(holds_first_or_last_stage, placement)
    utils.get_batch_on_this_tp_rank = _broadcast_every_field(utils.get_batch_on_this_tp_rank)
    training.get_megatron_optimizer = _in_stage_order(training.get_megatron_optimizer, placement)
    if run.uses_registry:
        from megatron_bitpipe.mcore import forward_backward

        forward_backward.install(run.schedule, **dict(run.schedule_options))
        schedule, _ = forward_backward.plan(
            forward_backward.ScheduleChoice(run.schedule, run.schedule_options),
            placement.num_ranks,
            run.num_microbatches,
        )
        if any(action.kind is Kind.I for program in schedule.programs for action in program):
            torch._functorch.config.donated_buffer = False


def _pretrain(original: Callable[..., Any], placement: Placement, tied: bool) -> Callable[..., Any]:
    @functools.wraps(original)
    def pretrain(*args: Any, extra_args_provider: Any = None, **kwargs: Any) -> Any:
        kwargs["get_embedding_ranks"] = functools.partial(embedding_ranks, placement, tied)
        return original(
            *args, extra_args_provider=_chained(add_arguments, extra_args_provider), **kwargs
        )

    return pretrain


def _chained(ours: Callable[[Any], Any], theirs: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    def provider(parser: Any) -> Any:
        parser = ours(parser)
        return parser if theirs is None else theirs(parser)

    return provider


def embedding_ranks(placement: Placement, tied: bool, pp_ranks: list[int]) -> list[int]:
    """Megatron's embedding group for one pipeline (``pp_ranks``: its global ranks).

    It sums the tied embedding's and head's gradients across ranks. A placement that ties inside
    each rank (V, Chimera, BitPipe) needs no such group, nor do untied embeddings; otherwise the
    first and the last rank, as Megatron-LM's own. Megatron calls it for every pipeline before
    this rank's groups exist, so it reads only ``pp_ranks``.
    """
    from megatron_bitpipe.mcore.model import ties_locally

    if not tied or ties_locally(placement) or len(pp_ranks) == 1:
        return [pp_ranks[0]]
    return [pp_ranks[0], pp_ranks[-1]]


def holds_first_or_last_stage(placement: Placement, vp_stage: int | None) -> bool:
    """Does this rank's chunk ``vp_stage`` (any chunk when None) hold a first or last stage?"""
    from megatron.core import parallel_state

    stages = placement.rank_stages[parallel_state.get_pipeline_model_parallel_rank()]
    chosen = stages if vp_stage is None else (stages[vp_stage],)
    return any(placement.is_first(stage) or placement.is_last(stage) for stage in chosen)


def _broadcast_every_field(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_batch_on_this_tp_rank(data_iterator: Any, mtp_on_this_rank: bool = False) -> Any:
        return original(data_iterator, mtp_on_this_rank=True)

    return get_batch_on_this_tp_rank


def _in_stage_order(original: Callable[..., Any], placement: Placement) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_megatron_optimizer(config: Any, model_chunks: list[Any], *args: Any, **kwargs: Any) -> Any:
        if placement.num_pipelines > 1:
            from megatron_bitpipe.mcore.model import unwrap

            model_chunks = sorted(
                model_chunks, key=lambda chunk: placement.position(unwrap(chunk).bitpipe_stage)
            )
        return original(config, model_chunks, *args, **kwargs)

    return get_megatron_optimizer


def get_model(
    run: RunPlan,
    model_provider_func: Callable[..., Any],
    model_type: Any = None,
    wrap_with_ddp: bool = True,
    config: Any = None,
    pg_collection: Any = None,
) -> list[Any]:
    """Megatron-LM's ``get_model`` for our placement (training.py:1161, same signature).

    Each chunk comes from Megatron-LM's own ``model_provider_func`` (the user's model, spec and
    arguments), at the layers and with the pre/post process the placement gives, and starts from
    the layout-independent initialization (``mcore.model.build_chunks``). Then as Megatron-LM:
    the device, ``Float16Module`` (cast by each chunk's own stage), DDP with Megatron-LM's
    settings from the arguments, over the placement's gradient groups.
    """
    from megatron.core import tensor_parallel
    from megatron.core.enums import ModelType
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_bitpipe.mcore import communication, groups
    from megatron_bitpipe.mcore import model as chunks_module
    from megatron_bitpipe.mcore.cpu import compute_device
    from megatron_bitpipe.mcore.precision import wrap_half_precision

    args = get_args()
    args.model_type = model_type = model_type or ModelType.encoder_or_decoder
    config = config or core_transformer_config_from_args(args)

    def factory(
        *,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None,
        share_embeddings_and_output_weights: bool,
    ) -> Any:
        untied = args.untie_embeddings_and_output_weights
        args.untie_embeddings_and_output_weights = not share_embeddings_and_output_weights
        try:
            chunk = model_provider_func(
                pre_process=pre_process,
                post_process=post_process,
                vp_stage=vp_stage,
                config=config,
                pg_collection=pg_collection,
            )
        finally:
            args.untie_embeddings_and_output_weights = untied
        chunk.model_type = model_type
        chunk.vp_stage = vp_stage
        return chunk

    chunks = chunks_module.build_chunks(
        config,
        run.placement,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        seed=args.seed,
        model_factory=factory,
    )
    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    chunks = wrap_half_precision([chunk.to(compute_device()) for chunk in chunks], config)
    if not wrap_with_ddp:
        return chunks
    group_timeout = timedelta(minutes=args.distributed_timeout_minutes)
    gradient_groups = groups.create_gradient_groups(run.placement, timeout=group_timeout)
    ddp_config = _ddp_config(args, sum(p.numel() for c in chunks for p in c.parameters()))
    model = groups.wrap_ddp(chunks, config, ddp_config, gradient_groups)
    groups.mark_replica_duplicates(
        model, run.placement, distributed_optimizer=args.use_distributed_optimizer
    )
    if run.uses_registry:
        communication.setup_communication(
            run.placement, gradient_groups, group_timeout=group_timeout
        )
    return model


def _ddp_config(args: Any, num_parameters: int) -> Any:
    """DistributedDataParallelConfig from the arguments, as Megatron-LM's get_model builds it
    (training.py:1283-1313)."""
    import dataclasses

    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig

    kwargs = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(DistributedDataParallelConfig)
        if hasattr(args, field.name)
    }
    kwargs["grad_reduce_in_fp32"] = args.accumulate_allreduce_grads_in_fp32
    kwargs["check_for_nan_in_grad"] = args.check_for_nan_in_loss_and_grad
    kwargs["check_for_large_grads"] = args.check_for_large_grads
    if args.ddp_num_buckets is not None:
        kwargs["bucket_size"] = num_parameters // args.ddp_num_buckets
    else:
        kwargs["bucket_size"] = args.ddp_bucket_size
    kwargs["pad_buckets_for_high_nccl_busbw"] = args.ddp_pad_buckets_for_high_nccl_busbw
    kwargs["reduce_scatter_with_fp32_accumulation"] = args.ddp_reduce_scatter_with_fp32_accumulation
    kwargs["average_in_collective"] = args.ddp_average_in_collective
    ddp_config = DistributedDataParallelConfig(**kwargs)
    if ddp_config.bucket_size is None:
        data_parallel = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        ddp_config.bucket_size = max(40000000, 1000000 * data_parallel)
    if not ddp_config.overlap_grad_reduce:
        ddp_config.bucket_size = None
    return ddp_config
