"""megatron-core's forward_backward contract, running any registered schedule.

    install(schedule="bitpipe")                # get_forward_backward_func() now returns ours
    losses = get_forward_backward_func()(forward_step_func=..., data_iterator=..., model=chunks,
                                         num_microbatches=N, seq_length=s, micro_batch_size=b)

Roughly: plan the schedule for (D, N) with the registry and lower it (cached), refuse the
megatron features the executor cannot honour, build the MegatronCallbacks for this call, run this
rank's program with the runtime Executor, then finalize gradients (finish the replica /
data-parallel reductions the REDUCE_GRAD actions started, tie local embeddings) and return the
loss dicts of every microbatch on ranks that compute a loss ([] elsewhere), in microbatch order.
After the first call the step makes no host synchronization: receives, sends and the loss
reduction only order the device's streams (``communication``, ``losses``). DDP's gradient checks
(``check_for_nan_in_grad``, ``check_for_large_grads``), which megatron runs with a host sync at
every bucket's reduction (each REDUCE_GRAD), run once per step after finalize instead, on the
reduced gradients: a NaN or Inf of any rank's contribution reaches the reduced sum. Steps run
inside ``tracing()`` time their actions with CUDA events; others with host time, at no device cost.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.utils import get_model_config

from megatron_bitpipe.mcore import communication, dropout, weight_grad_store
from megatron_bitpipe.mcore.callbacks import MegatronCallbacks, MicrobatchFeed
from megatron_bitpipe.mcore.cpu import compute_device
from megatron_bitpipe.mcore.features import check_supported
from megatron_bitpipe.mcore.losses import reduce_losses
from megatron_bitpipe.mcore.model import (
    tie_embedding_grads,
    tied_embedding_pairs,
    unwrap,
)
from megatron_bitpipe.runtime import Executor, forward_program
from megatron_bitpipe.runtime.clock import default_clock
from megatron_bitpipe.schedules import (
    Action,
    Kind,
    Placement,
    Schedule,
    get,
    lower,
)
from megatron_bitpipe.schedules.choice import ScheduleChoice
from megatron_bitpipe.schedules.lower import send_completions

_PATCH_SITES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel",
    "megatron.training.training",
)


@dataclass
class _State:
    choice: ScheduleChoice | None = None
    originals: dict[str, Callable[..., Any]] = field(default_factory=dict)
    last_executor: Executor | None = None
    trace: bool = False
    cpu_time: bool = False
    last_finalize_seconds: float = 0.0


_STATE = _State()


@contextlib.contextmanager
def tracing(enabled: bool = True, *, cpu_time: bool = False) -> Iterator[None]:
    """Steps run inside time their actions with CUDA events (GPU time in the trace); on a CPU,
    with ``cpu_time``, also with each action's process CPU time."""
    previous = _STATE.trace, _STATE.cpu_time
    _STATE.trace, _STATE.cpu_time = enabled, enabled and cpu_time
    try:
        yield
    finally:
        _STATE.trace, _STATE.cpu_time = previous


@functools.lru_cache(maxsize=64)
def plan(
    choice: ScheduleChoice, num_ranks: int, num_microbatches: int
) -> tuple[Schedule, Schedule]:
    """(compute-only, lowered) schedule: the choice's own build (made once); errors name the
    setting and the rule."""
    get(choice.name)  # megatron-core's own functions are not in the registry: refused here
    schedule = choice.build(num_ranks, num_microbatches)
    assert schedule is not None
    return schedule, lower(schedule, grad_sync=True)


@functools.lru_cache(maxsize=64)
def _send_completions(
    choice: ScheduleChoice, num_ranks: int, num_microbatches: int
) -> tuple[dict[Action, tuple[Action, ...]], ...]:
    return send_completions(plan(choice, num_ranks, num_microbatches)[1])


def forward_backward_func(
    *,
    forward_step_func: Callable[..., Any],
    data_iterator: Any,
    model: Any,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    decoder_seq_length: int | None = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool | None = None,
    **rest: Any,
) -> list[Any]:
    """Run one step of the installed schedule; megatron-core's signature and return value.

    ``model`` is this rank's chunk list in placement order (``mcore.model.build_chunks``),
    DDP-wrapped over the gradient groups for bidirectional schedules. Extra keywords:
    ``schedule`` (a ScheduleChoice, default the installed one), ``pg_collection``,
    ``force_all_reduce``; megatron's ``adjust_tensor_shapes_fn`` / ``p2p_communicator`` must
    be None.
    """
    choice, pg_collection, force_all_reduce = _extra_arguments(rest)
    if not forward_only:
        dropout.next_step()
    chunks = model if isinstance(model, list) else [model]
    config = get_model_config(chunks[0])
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    schedule, lowered = plan(choice, pp_group.size(), num_microbatches)
    placement, program = schedule.placement, lowered.programs[pp_rank]
    _check_model(chunks, placement, pp_rank, forward_only)
    splits_backward = any(action.kind is Kind.I for action in program)
    ddp_configs = [chunk.ddp_config for chunk in chunks if hasattr(chunk, "ddp_config")]
    uncovered = weight_grad_store.uncovered_linears(chunks) if splits_backward else []
    check_supported(choice.name, config, ddp_configs, splits_backward, placement, uncovered)
    if splits_backward:
        weight_grad_store.install()
    if not communication.is_set_up(placement):
        communication.setup_communication(placement, getattr(chunks[0], "bitpipe_groups", None))
    if config.timers is not None:
        config.timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)
    callbacks = MegatronCallbacks(
        model=chunks,
        placement=placement,
        config=config,
        forward_step_func=forward_step_func,
        feed=_feed(data_iterator, placement, pp_rank, num_microbatches),
        num_microbatches=num_microbatches,
        cp_group_size=parallel_state.get_context_parallel_world_size(),
        loss_scale=_replica_loss_scale(chunks, placement),
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
        first_microbatch=_first_forward(program),
        first_val_step=first_val_step,
    )
    shape = _activation_shape(config, decoder_seq_length or seq_length, micro_batch_size)
    dtype = config.pipeline_dtype or config.params_dtype
    completions = _send_completions(choice, pp_group.size(), num_microbatches)[pp_rank]
    p2p = communication.p2p_for_step(placement, pp_rank, shape, dtype, completions)
    clock = default_clock(trace=_STATE.trace, cpu_time=_STATE.cpu_time)
    executor = Executor(placement, pp_rank, callbacks, p2p, clock=clock)
    _STATE.last_executor = executor
    if forward_only:
        with torch.no_grad():
            executor.run(forward_program(program), forward_only=True)
    else:
        with _grad_checks_deferred(chunks) as checks:
            with _no_sync(chunks), _weight_grads_of_this_step():
                executor.run(program)
            finalize_start = time.perf_counter()
            _finalize(chunks, placement, config, callbacks, pg_collection, force_all_reduce)
            _STATE.last_finalize_seconds = time.perf_counter() - finalize_start
        check_grads(chunks, *checks)
    if config.timers is not None:
        config.timers("forward-backward").stop()
    return reduce_losses(
        callbacks.outputs,
        placement,
        pp_rank,
        pp_group,
        num_microbatches=num_microbatches,
        device=compute_device(),
        cache_key=(choice, num_microbatches, forward_only),
        collect_non_loss_data=collect_non_loss_data,
    )


def _replica_loss_scale(chunks: list[Any], placement: Placement) -> float:
    """1, or the replica count when DDP averages over the replicas instead of summing (chunks
    not wrapped by ``mcore.groups.wrap_ddp``): doubling the loss then makes the average a sum."""
    if placement.num_pipelines == 1 or all(getattr(c, "sums_replicas", False) for c in chunks):
        return 1.0
    return float(placement.num_pipelines)


def _extra_arguments(rest: dict[str, Any]) -> tuple[ScheduleChoice, Any, bool]:
    """(schedule, pg_collection, force_all_reduce) from the keywords beyond the common ones."""
    choice = rest.pop("schedule", None) or _STATE.choice
    if choice is None:
        raise RuntimeError(
            "no schedule installed: call megatron_bitpipe.mcore.install(schedule=...)"
        )
    pg_collection = rest.pop("pg_collection", None)
    force_all_reduce = bool(rest.pop("force_all_reduce", False))
    for unsupported in ("adjust_tensor_shapes_fn", "p2p_communicator"):
        if rest.pop(unsupported, None) is not None:
            raise NotImplementedError(f"{choice.name}: {unsupported} is not supported")
    if rest:
        raise TypeError(
            f"forward_backward_func got unexpected arguments: {', '.join(sorted(rest))}"
        )
    return choice, pg_collection, force_all_reduce


def last_finalize_seconds() -> float:
    """Host seconds the last training step spent finalizing gradients after its program: the
    gradient syncs the program's REDUCE_GRADs did not finish in time, and the ones it leaves to
    finalize (data parallel without a replica)."""
    return _STATE.last_finalize_seconds


def last_executor() -> Executor | None:
    """The Executor of the latest call on this process (its ``trace`` and ``peak_live_activations``)."""
    return _STATE.last_executor


def _check_model(chunks: list[Any], placement: Placement, pp_rank: int, forward_only: bool) -> None:
    expected = placement.rank_stages[pp_rank]
    if len(chunks) != len(expected):
        raise ValueError(
            f"pipeline rank {pp_rank} of the {placement.kind} placement holds {len(expected)} "
            f"chunks, but model has {len(chunks)}: build it with mcore.model.build_chunks"
        )
    for chunk, stage in zip(chunks, expected, strict=True):
        built_for = getattr(unwrap(chunk), "bitpipe_stage", None)
        if built_for is None and placement.kind == "looped":
            continue
        if built_for != stage:
            raise ValueError(
                f"pipeline rank {pp_rank}: the chunk for stage {stage} was built for {built_for}; "
                f"build the model with mcore.model.build_chunks for the {placement.kind} placement"
            )
    if placement.num_pipelines > 1 and not forward_only:
        for chunk in chunks:
            if not hasattr(chunk, "start_grad_sync"):
                raise ValueError(
                    f"{placement.kind}: wrap every chunk with mcore.groups.wrap_ddp so the two "
                    f"replicas of each stage average their gradients"
                )


def _feed(
    data_iterator: Any, placement: Placement, pp_rank: int, num_microbatches: int
) -> MicrobatchFeed:
    """Chunks holding a first or last stage read data (tokens, or labels and loss mask)."""
    needs_data = [
        placement.is_first(stage) or placement.is_last(stage)
        for stage in placement.rank_stages[pp_rank]
    ]
    return MicrobatchFeed(data_iterator, needs_data, num_microbatches)


def _first_forward(program: tuple[Action, ...]) -> dict[int, int]:
    """Stage -> microbatch of its first forward on this rank (megatron's is_first_microbatch)."""
    first: dict[int, int] = {}
    for action in program:
        if action.kind is Kind.F:
            first.setdefault(action.stage, action.microbatch)
    return first


def _activation_shape(config: Any, seq_length: int, micro_batch_size: int) -> tuple[int, int, int]:
    """What megatron's get_tensor_shapes gives: (seq / cp [/ tp with SP], micro-batch, hidden)."""
    length = seq_length // parallel_state.get_context_parallel_world_size()
    if config.sequence_parallel:
        length //= parallel_state.get_tensor_model_parallel_world_size()
    return (length, micro_batch_size, config.hidden_size)


def _no_sync(chunks: list[Any]) -> contextlib.ExitStack:
    """Hold back DDP's per-bucket launches: REDUCE_GRAD and finalize decide when to reduce."""
    stack = contextlib.ExitStack()
    for chunk in chunks:
        if hasattr(chunk, "no_sync"):
            stack.enter_context(chunk.no_sync())
    return stack


@contextlib.contextmanager
def _weight_grads_of_this_step() -> Iterator[None]:
    """Every weight gradient an I of this step queues is computed by its W in this step; a step
    that fails leaves none behind for the next (which would count them twice)."""
    try:
        yield
    except BaseException:
        weight_grad_store.STORE.discard()
        raise
    left = weight_grad_store.STORE.pending()
    if left:
        weight_grad_store.STORE.discard()
        raise RuntimeError(f"weight gradients queued by an I and never computed by its W: {left[:4]}")


@contextlib.contextmanager
def _grad_checks_deferred(chunks: list[Any]) -> Iterator[tuple[bool, bool]]:
    """Switch DDP's per-bucket gradient checks off for the step; yield (nan_or_inf, large): the
    checks any chunk's config asked for, which ``check_grads`` then runs once."""
    configs = {id(c.ddp_config): c.ddp_config for c in chunks if hasattr(c, "ddp_config")}
    saved = [
        (config, config.check_for_nan_in_grad, config.check_for_large_grads)
        for config in configs.values()
    ]
    checks = (any(nan for _, nan, _ in saved), any(large for _, _, large in saved))
    for config, _, _ in saved:
        config.check_for_nan_in_grad = config.check_for_large_grads = False
    try:
        yield checks
    finally:
        for config, nan, large in saved:
            config.check_for_nan_in_grad, config.check_for_large_grads = nan, large


def check_grads(chunks: list[Any], nan_or_inf: bool, large: bool) -> None:
    """megatron's DDP gradient checks with one host sync: on the norm of every bucket of every
    chunk together (float64), through megatron's rerun state machine (fatal for NaN and Inf)."""
    if not (nan_or_inf or large):
        return
    buffers = [
        buffer
        for chunk in chunks
        for name in ("buffers", "expert_parallel_buffers")
        for buffer in getattr(chunk, name, ())
    ]
    norms = [bucket.grad_data.norm(p=2).float() for buffer in buffers for bucket in buffer.buckets]
    if not norms:
        return
    total = torch.stack(norms).double().square().sum().sqrt()
    norm = torch.tensor(total.item(), dtype=torch.float64)
    machine = get_rerun_state_machine()
    where = "local grad norm of this rank's chunks after the step's gradient reductions"
    if nan_or_inf:
        for reject, found in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(
                result=norm,
                rejection_func=reject,
                message=f"found {found} in the {where}",
                tolerance=0.001,
                fatal=True,
            )
    if large:
        machine.validate_result(
            result=norm,
            rejection_func=functools.partial(
                machine.is_unexpectedly_large, threshold=10, context="grads"
            ),
            message=f"found unexpectedly large grads in the {where}",
            tolerance=0.001,
            fatal=False,
        )


def _finalize(
    chunks: list[Any],
    placement: Placement,
    config: Any,
    callbacks: MegatronCallbacks,
    pg_collection: Any,
    force_all_reduce: bool,
) -> None:
    """finalize_model_grads over chunks in stage-position order (the order replicas share)."""
    if config.finalize_model_grads_func is None:
        if tied_embedding_pairs(chunks):
            raise RuntimeError(
                f"{placement.kind}: locally tied embeddings need config.finalize_model_grads_func "
                f"(megatron.core.distributed.finalize_model_grads)"
            )
        return
    ordered = chunks
    if placement.num_pipelines > 1:
        ordered = sorted(chunks, key=lambda chunk: placement.position(unwrap(chunk).bitpipe_stage))
    num_tokens = callbacks.total_num_tokens if config.calculate_per_token_loss else None
    config.finalize_model_grads_func(
        ordered, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce
    )
    tie_embedding_grads(chunks)


def install(schedule: str | ScheduleChoice = "bitpipe", **options: Any) -> ScheduleChoice:
    """Make megatron-core's get_forward_backward_func (and Megatron-LM's) return ours, running
    ``schedule`` (a choice, or a registry name with ``options``); returns the installed choice."""
    choice = (
        schedule
        if isinstance(schedule, ScheduleChoice)
        else ScheduleChoice(schedule, tuple(sorted(options.items())))
    )
    get(choice.name)
    _STATE.choice = choice

    def get_forward_backward_func(*args: Any, **kwargs: Any) -> Callable[..., list[Any]]:
        return forward_backward_func

    for module_name in _PATCH_SITES:
        module = sys.modules.get(module_name)
        if module is None or not hasattr(module, "get_forward_backward_func"):
            continue
        _STATE.originals.setdefault(module_name, module.get_forward_backward_func)
        module.get_forward_backward_func = get_forward_backward_func
    return choice


def uninstall() -> None:
    """Restore megatron's own get_forward_backward_func everywhere ``install`` patched it."""
    for module_name, original in _STATE.originals.items():
        sys.modules[module_name].get_forward_backward_func = original
    _STATE.originals.clear()
    _STATE.choice = None


def installed() -> ScheduleChoice | None:
    """The schedule ``install`` chose, or None."""
    return _STATE.choice
