"""Every hook megatron_bitpipe puts into Megatron-LM, per release, and the lines each replaces.

Checked against the tags core_v0.16.1 (megatron-core 0.16.1), core_v0.17.1, core_v0.18.2 and
core_v0.19.0 (megatron-core 0.19.2); ``file:line`` below is given per tag as 0.16/0.17/0.18/0.19.
All are module attributes set before ``pretrain_gpt.py`` is imported (it imports several by
name); no Megatron-LM file is edited. What moved between releases is one ``Release`` record.

* ``pretrain``: ``megatron.training.pretrain`` (training.py:702/813/1029/1014, called by
  pretrain_gpt.py:342/412/400/523). Passes the placement's embedding group
  (``get_embedding_ranks``); up to 0.17 also our ``extra_args_provider``.
* ``parse_and_validate_args`` (0.18+): ``megatron.training.arguments`` (arguments.py:98/87,
  called by pretrain_gpt.py:395/512), which took over parsing from ``pretrain``. Adds our
  ``extra_args_provider``.
* ``get_forward_backward_func``: ``megatron.training.training`` (called at training.py:2607,
  2799, 3292, 3614; 0.19 passes ``schedule_pg_collection``). Our schedule (``mcore.install``).
* the model: ``megatron.training.training.get_model`` (training.py:1161/1308/1622, same
  signature) up to 0.18; from 0.19 ``pretrain_gpt.py`` hands a model config to ``pretrain`` and
  ``setup_model_and_optimizer`` builds through ``GPTModelBuilder.build_distributed_models``
  (training.py:2050; models/gpt.py:331). Both become our chunks: a V / BitPipe rank holds 2 or 4
  chunks at placement-defined layers, and replicas need the replica-pair DDP groups.
* ``is_first_or_last_pipeline_stage``: ``megatron.training.utils`` (utils.py:434/441, 0.18+
  utils/common_utils.py:442/490; used by pretrain_gpt.py's ``get_batch`` and dataset builder).
  A V rank holds the first and the last stage: which chunk loads tokens and labels follows the
  placement.
* ``get_batch_on_this_tp_rank``: ``megatron.training.utils`` (utils.py:517/524) up to 0.17,
  ``megatron.core.utils`` from 0.18 (pretrain_gpt.py:75/124/100/133). With TP > 1 it broadcasts
  labels only on the last pipeline rank: every field is broadcast.
* ``get_megatron_optimizer``: ``megatron.training.training`` (called at training.py:1463/1637/
  1979/2132). Both replicas of a stage hand their parameters over in one order (stage position),
  and key the distributed optimizer's checkpoint buckets alike
  (``mcore.checkpointing.share_optimizer_keys_with_replicas``).
* grad norm: ``param.shared`` on the up replica, so each stage counts once
  (``mcore.groups.mark_replica_duplicates``, inside the model hook).
* process groups: the gradient groups and our p2p channels take ``--distributed-timeout-minutes``
  as Megatron-LM's own groups do.
* gradient checks: ``--check-for-nan-in-loss-and-grad`` / ``--check-for-large-grads`` reach DDP's
  config as in Megatron-LM; our ``forward_backward_func`` runs them once per step after finalize
  (one host sync) instead of at every REDUCE_GRAD (``mcore.forward_backward.check_grads``).
* donated buffers: ``torch._functorch.config.donated_buffer`` off for schedules that split the
  backward, which run autograd twice over compiled fusions (bias-dropout).
"""

from __future__ import annotations

import dataclasses
import functools
from datetime import timedelta
from typing import Any, Callable

import torch

from megatron_bitpipe.megatron_lm.arguments import add_arguments
from megatron_bitpipe.run_plan import RunPlan
from megatron_bitpipe.schedules.ir import Kind
from megatron_bitpipe.schedules.placement import Placement


@dataclasses.dataclass(frozen=True)
class Release:
    """Where one Megatron-LM release range keeps what the hooks replace."""

    tags: str
    batch_module: str
    """The module ``pretrain_gpt.py`` imports ``get_batch_on_this_tp_rank`` from."""
    script_parses_arguments: bool
    """``pretrain_gpt.py`` calls ``parse_and_validate_args`` itself (0.18+), not ``pretrain``."""
    model_builder: bool
    """The model comes from ``GPTModelBuilder.build_distributed_models`` (0.19+), not ``get_model``."""


RELEASES = {
    (0, 16): Release("core_v0.16.1", "megatron.training.utils", False, False),
    (0, 17): Release("core_v0.17.1", "megatron.training.utils", False, False),
    (0, 18): Release("core_v0.18.2", "megatron.core.utils", True, False),
    (0, 19): Release("core_v0.19.0", "megatron.core.utils", True, True),
}
"""megatron-core (major, minor) -> the Megatron-LM release checked against it."""

SUPPORTED_RANGE = "core_v0.16.x to core_v0.19.x"


class UnsupportedMegatronLM(RuntimeError):
    """The installed Megatron-LM / megatron-core is not one the hooks were checked against."""


def installed_version() -> tuple[int, ...]:
    """megatron-core's version from its package metadata: importing megatron.core prints
    warnings, which must not come before a one-line settings error."""
    import importlib.metadata
    import re

    text = importlib.metadata.version("megatron-core")
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def release() -> Release:
    """The release record of the installed megatron-core; one line naming the range if none."""
    found = installed_version()
    if found[:2] not in RELEASES:
        raise UnsupportedMegatronLM(
            f"megatron-core {'.'.join(map(str, found))}: the Megatron-LM hooks are checked against "
            f"{SUPPORTED_RANGE} only; use a Megatron-LM checkout of that range with the "
            f"megatron-core release of the same minor version"
        )
    return RELEASES[found[:2]]


def check_version(script: str | None = None, training: str | None = None) -> None:
    """Raise ``UnsupportedMegatronLM`` outside the checked releases, or when ``script`` (a
    ``pretrain_gpt.py``) and the ``megatron.training`` it imports (``training``: that folder, by
    default the one ``sys.path`` finds) are of another release range than megatron-core's."""
    found = release()
    if script is None:
        return
    layout = checkout_layout(script, training)
    if layout != (found.script_parses_arguments, found.model_builder):
        raise UnsupportedMegatronLM(
            f"{script} is a Megatron-LM {_LAYOUTS[layout]} script, but megatron-core "
            f"{'.'.join(map(str, installed_version()))} is installed: use the checkout of tag "
            f"{found.tags} (or install the megatron-core of the checkout's release)"
        )


_LAYOUTS = {
    (False, False): "core_v0.16-0.17",
    (True, False): "core_v0.18",
    (True, True): "core_v0.19",
    (False, True): "unknown",
}
"""``checkout_layout`` -> the releases that have it."""


def checkout_layout(script: str, training: str | None = None) -> tuple[bool, bool]:
    """(the script parses its arguments, the model comes from ``GPTModelBuilder``) for a
    ``pretrain_gpt.py`` and the ``megatron.training`` that ``sys.path`` finds first (megatron-core
    0.19 wheels ship one too), read without importing."""
    import importlib.util
    import os

    with open(script, encoding="utf-8") as handle:
        parses = "parse_and_validate_args(" in handle.read()
    if training is None:
        spec = importlib.util.find_spec("megatron")
        locations = list(spec.submodule_search_locations or []) if spec else []
        found = [os.path.join(at, "training") for at in locations if os.path.isdir(os.path.join(at, "training"))]
        training = found[0] if found else ""
    builder = os.path.isfile(os.path.join(training, "models", "gpt.py"))
    return parses, builder


def install(run: RunPlan, *, tied_embeddings: bool) -> None:
    """Apply every hook for ``run`` (call before ``pretrain_gpt.py`` is imported)."""
    import importlib

    import megatron.training
    from megatron.training import arguments, training, utils

    found = release()
    placement = run.placement
    megatron.training.pretrain = _pretrain(
        megatron.training.pretrain,
        placement,
        tied_embeddings,
        add_our_arguments=not found.script_parses_arguments,
    )
    if found.script_parses_arguments:
        arguments.parse_and_validate_args = _parsing_our_arguments(arguments.parse_and_validate_args)
    if found.model_builder:
        from megatron.training.models.gpt import GPTModelBuilder

        GPTModelBuilder.build_distributed_models = _built_by_placement(run)
    else:
        training.get_model = functools.partial(get_model, run)
    utils.is_first_or_last_pipeline_stage = functools.partial(holds_first_or_last_stage, placement)
    batch_module = importlib.import_module(found.batch_module)
    batch_module.get_batch_on_this_tp_rank = _broadcast_every_field(batch_module.get_batch_on_this_tp_rank)
    training.get_megatron_optimizer = _in_stage_order(training.get_megatron_optimizer, placement)
    if run.uses_registry:
        from megatron_bitpipe.mcore import forward_backward

        forward_backward.install(run.choice)
        if any(action.kind is Kind.I for program in run.built.programs for action in program):
            torch._functorch.config.donated_buffer = False


def _pretrain(
    original: Callable[..., Any], placement: Placement, tied: bool, *, add_our_arguments: bool
) -> Callable[..., Any]:
    @functools.wraps(original)
    def pretrain(*args: Any, **kwargs: Any) -> Any:
        kwargs["get_embedding_ranks"] = functools.partial(embedding_ranks, placement, tied)
        if add_our_arguments:
            kwargs["extra_args_provider"] = _chained(add_arguments, kwargs.get("extra_args_provider"))
        return original(*args, **kwargs)

    return pretrain


def _parsing_our_arguments(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def parse_and_validate_args(extra_args_provider: Any = None, *args: Any, **kwargs: Any) -> Any:
        return original(_chained(add_arguments, extra_args_provider), *args, **kwargs)

    return parse_and_validate_args


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
    """``mtp_on_this_rank=True`` makes every release broadcast every field over TP."""

    @functools.wraps(original)
    def get_batch_on_this_tp_rank(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "mtp_on_this_rank": True})

    return get_batch_on_this_tp_rank


def _in_stage_order(original: Callable[..., Any], placement: Placement) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_megatron_optimizer(config: Any, model_chunks: list[Any], *args: Any, **kwargs: Any) -> Any:
        if placement.num_pipelines == 1:
            return original(config, model_chunks, *args, **kwargs)
        from megatron_bitpipe.mcore.checkpointing import share_optimizer_keys_with_replicas
        from megatron_bitpipe.mcore.model import unwrap

        model_chunks = sorted(
            model_chunks, key=lambda chunk: placement.position(unwrap(chunk).bitpipe_stage)
        )
        optimizer = original(config, model_chunks, *args, **kwargs)
        share_optimizer_keys_with_replicas(optimizer, placement)
        return optimizer

    return get_megatron_optimizer


def get_model(
    run: RunPlan,
    model_provider_func: Callable[..., Any],
    model_type: Any = None,
    wrap_with_ddp: bool = True,
    config: Any = None,
    pg_collection: Any = None,
) -> list[Any]:
    """Megatron-LM's ``get_model`` for our placement (up to 0.18; same signature).

    Each chunk comes from Megatron-LM's own ``model_provider_func`` (the user's model, spec and
    arguments), at the layers and with the pre/post process the placement gives.
    """
    from megatron.core.enums import ModelType
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    args.model_type = model_type = model_type or ModelType.encoder_or_decoder
    config = config or core_transformer_config_from_args(args)

    def build_chunk(*, share_embeddings_and_output_weights: bool, **placed: Any) -> Any:
        untied = args.untie_embeddings_and_output_weights
        args.untie_embeddings_and_output_weights = not share_embeddings_and_output_weights
        try:
            return model_provider_func(**placed, config=config, pg_collection=pg_collection)
        finally:
            args.untie_embeddings_and_output_weights = untied

    ddp_config = _ddp_config(args) if wrap_with_ddp else None
    tied = not args.untie_embeddings_and_output_weights
    return _placed_model(run, build_chunk, config, args, model_type, ddp_config, tied=tied)


def _built_by_placement(run: RunPlan) -> Callable[..., list[Any]]:
    """``GPTModelBuilder.build_distributed_models`` for our placement (0.19+).

    Each chunk comes from the builder's own ``build_model`` (the model config ``pretrain_gpt.py``
    made from the arguments), at the layers and with the pre/post process the placement gives;
    DDP takes the run's ``ddp_config``.
    """

    def build_distributed_models(
        builder: Any,
        pg_collection: Any,
        ddp_config: Any = None,
        *args: Any,
        wrap_with_ddp: bool = True,
        model_type: Any = None,
        **kwargs: Any,
    ) -> list[Any]:
        from megatron.core.enums import ModelType
        from megatron.training import get_args

        model_config = builder._model_config

        def build_chunk(*, share_embeddings_and_output_weights: bool, **placed: Any) -> Any:
            tied = model_config.share_embeddings_and_output_weights
            model_config.share_embeddings_and_output_weights = share_embeddings_and_output_weights
            try:
                return builder.build_model(pg_collection, **placed)
            finally:
                model_config.share_embeddings_and_output_weights = tied

        margs = get_args()
        margs.model_type = model_type = model_type or ModelType.encoder_or_decoder
        return _placed_model(
            run,
            build_chunk,
            model_config.transformer,
            margs,
            model_type,
            ddp_config if wrap_with_ddp else None,
            tied=model_config.share_embeddings_and_output_weights,
        )

    return build_distributed_models


def _placed_model(
    run: RunPlan,
    build_chunk: Callable[..., Any],
    config: Any,
    args: Any,
    model_type: Any,
    ddp_config: Any,
    *,
    tied: bool,
) -> list[Any]:
    """The placement's chunks from ``build_chunk``, then wrapped as Megatron-LM wraps its own.

    Chunks start from the layout-independent initialization (``mcore.model.build_chunks``);
    ``tied``: the model ties its embedding and head. Then: the device, ``Float16Module`` (cast by
    each chunk's own stage), and, with a ``ddp_config``, DDP over the placement's gradient groups.
    """
    from megatron.core import tensor_parallel

    from megatron_bitpipe.mcore import communication, groups
    from megatron_bitpipe.mcore import model as chunks_module
    from megatron_bitpipe.mcore.cpu import compute_device
    from megatron_bitpipe.mcore.precision import wrap_half_precision

    def factory(**placed: Any) -> Any:
        chunk = build_chunk(**placed)
        chunk.model_type = model_type
        chunk.vp_stage = placed["vp_stage"]
        return chunk

    chunks = chunks_module.build_chunks(
        config,
        run.placement,
        share_embeddings_and_output_weights=tied,
        seed=args.seed,
        model_factory=factory,
    )
    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    chunks = wrap_half_precision([chunk.to(compute_device()) for chunk in chunks], config)
    if ddp_config is None:
        return chunks
    num_parameters = sum(p.numel() for c in chunks for p in c.parameters())
    _resolve_bucket_size(ddp_config, num_parameters, getattr(args, "ddp_num_buckets", None))
    group_timeout = timedelta(minutes=args.distributed_timeout_minutes)
    gradient_groups = groups.create_gradient_groups(run.placement, timeout=group_timeout)
    model = groups.wrap_ddp(chunks, config, ddp_config, gradient_groups)
    groups.mark_replica_duplicates(
        model, run.placement, distributed_optimizer=args.use_distributed_optimizer
    )
    if run.uses_registry:
        communication.setup_communication(
            run.placement, gradient_groups, group_timeout=group_timeout
        )
    return model


def _ddp_config(args: Any) -> Any:
    """DistributedDataParallelConfig from the arguments, as Megatron-LM's ``get_model`` builds it
    (0.18+: its own ``get_megatron_ddp_config``; before: training.py:1283-1313 of 0.16.1)."""
    import dataclasses

    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.training import training

    if hasattr(training, "get_megatron_ddp_config"):
        return training.get_megatron_ddp_config(args)
    kwargs = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(DistributedDataParallelConfig)
        if hasattr(args, field.name)
    }
    kwargs["grad_reduce_in_fp32"] = args.accumulate_allreduce_grads_in_fp32
    kwargs["check_for_nan_in_grad"] = args.check_for_nan_in_loss_and_grad
    kwargs["check_for_large_grads"] = args.check_for_large_grads
    kwargs["bucket_size"] = args.ddp_bucket_size
    kwargs["pad_buckets_for_high_nccl_busbw"] = args.ddp_pad_buckets_for_high_nccl_busbw
    kwargs["reduce_scatter_with_fp32_accumulation"] = args.ddp_reduce_scatter_with_fp32_accumulation
    kwargs["average_in_collective"] = args.ddp_average_in_collective
    return DistributedDataParallelConfig(**kwargs)


def _resolve_bucket_size(ddp_config: Any, num_parameters: int, num_buckets: int | None) -> None:
    """Megatron-LM's bucket size rule (0.16 training.py:1303-1313; 0.19 training.py:1552):
    parameters // buckets when a bucket count is given, else at least 40M elements, and one
    bucket per chunk without overlapped reduction."""
    from megatron.core import parallel_state

    buckets = getattr(ddp_config, "num_buckets", None) or num_buckets
    if buckets is not None:
        ddp_config.bucket_size = num_parameters // buckets
    elif ddp_config.bucket_size is None:
        data_parallel = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        ddp_config.bucket_size = max(40000000, 1000000 * data_parallel)
    if not ddp_config.overlap_grad_reduce:
        ddp_config.bucket_size = None
