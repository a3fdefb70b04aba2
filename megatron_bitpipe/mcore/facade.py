"""One call from megatron-core's own training loop: ``pipeline(...)`` builds, wraps and installs.

    pipe = mcore.pipeline("bitpipe", config, ddp_config, num_microbatches=8, seed=1234,
                          vocab_size=..., max_sequence_length=...)
    losses = pipe.forward_backward_func(forward_step_func=..., data_iterator=..., model=pipe.model,
                                        num_microbatches=8, seq_length=s, micro_batch_size=b)

The four calls it makes in order, as our trainer does: ``build_chunks`` (this rank's chunks of
the schedule's placement, on the compute device, ``StageFloat16Module`` for bf16/fp16),
``create_gradient_groups`` and ``wrap_ddp`` (megatron's DDP over each stage's replicas and
data-parallel ranks), ``install`` and ``setup_communication`` (every communicator of a step made
now, in the one order that cannot deadlock, rather than inside the first step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.transformer import TransformerConfig

from megatron_bitpipe.mcore.communication import setup_communication
from megatron_bitpipe.mcore.cpu import compute_device
from megatron_bitpipe.mcore.forward_backward import (
    ScheduleChoice,
    forward_backward_func,
    install,
    plan,
)
from megatron_bitpipe.mcore.groups import (
    GradientGroups,
    create_gradient_groups,
    mark_replica_duplicates,
    wrap_ddp,
)
from megatron_bitpipe.mcore.model import ModelFactory, StageLayout, build_chunks, unwrap
from megatron_bitpipe.mcore.precision import wrap_half_precision
from megatron_bitpipe.mcore.specs import LayerSpec
from megatron_bitpipe.runtime.p2p import DEFAULT_TIMEOUT_S
from megatron_bitpipe.schedules.placement import Placement


@dataclass(frozen=True)
class Pipeline:
    """What ``pipeline`` built on this rank."""

    model: list[DistributedDataParallel]
    """This rank's chunks in placement order, DDP-wrapped: the ``model`` of every step."""
    forward_backward_func: Callable[..., list[Any]]
    """megatron-core's forward_backward contract, running the schedule."""
    placement: Placement
    groups: GradientGroups
    """Each stage's gradient group (``mcore.assert_replicas_identical(pipe.model, pipe.groups)``)."""

    @property
    def optimizer_chunks(self) -> list[DistributedDataParallel]:
        """The chunks in stage-position order, the one order both replicas of a stage share:
        give these to ``get_megatron_optimizer`` so the replicas' optimizers stay identical."""
        return sorted(self.model, key=lambda c: self.placement.position(unwrap(c).bitpipe_stage))


def pipeline(
    schedule: str,
    config: TransformerConfig,
    ddp_config: DistributedDataParallelConfig,
    *,
    num_microbatches: int,
    seed: int,
    share_embeddings_and_output_weights: bool = True,
    vocab_size: int | None = None,
    max_sequence_length: int | None = None,
    layer_spec: LayerSpec | None = None,
    model_factory: ModelFactory | None = None,
    step_timeout_s: float = DEFAULT_TIMEOUT_S,
    group_timeout: timedelta | None = None,
    **options: Any,
) -> Pipeline:
    """Build, DDP-wrap, install and set up ``schedule`` (registry name, ``options`` its own, e.g.
    ``vp``) for ``num_microbatches`` per step; collective, after ``parallel_state`` is initialized.

    The model is ``build_chunks``'s (a ``GPTModel`` of ``vocab_size`` and ``max_sequence_length``,
    or ``model_factory``'s). ``config`` is completed in place: a virtual pipeline size left None
    becomes the placement's, and ``finalize_model_grads_func`` left None becomes megatron's
    ``finalize_model_grads`` (it finishes the replicas' gradient reductions). Set
    ``config.grad_scale_func`` after building the optimizer, as megatron does. A schedule that
    cannot run (D, N) raises ``ScheduleConfigError`` on every rank before anything is built.
    """
    choice = ScheduleChoice(schedule, tuple(sorted(options.items())))
    pipeline_ranks = parallel_state.get_pipeline_model_parallel_world_size()
    placement = plan(choice, pipeline_ranks, num_microbatches)[0].placement
    if config.virtual_pipeline_model_parallel_size is None:
        config.virtual_pipeline_model_parallel_size = StageLayout(
            placement, config.num_layers
        ).virtual_size()
    chunks = build_chunks(
        config,
        placement,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        seed=seed,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        layer_spec=layer_spec,
        model_factory=model_factory,
    )
    # on the device before DDP, which allocates its buffers where the chunk is
    chunks = wrap_half_precision([chunk.to(compute_device()) for chunk in chunks], config)
    groups = create_gradient_groups(placement, timeout=group_timeout)
    model = wrap_ddp(chunks, config, ddp_config, groups)
    mark_replica_duplicates(
        model, placement, distributed_optimizer=ddp_config.use_distributed_optimizer
    )
    if config.finalize_model_grads_func is None:
        config.finalize_model_grads_func = finalize_model_grads
    install(choice)
    setup_communication(placement, groups, timeout_s=step_timeout_s, group_timeout=group_timeout)
    return Pipeline(model, forward_backward_func, placement, groups)
