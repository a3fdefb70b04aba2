"""The megatron-core side of ``megatron_bitpipe.train``: groups, model, optimizer, the loop.

``run(args, plans)`` takes arguments already checked by ``train.validate_args``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import megatron.core.pipeline_parallel as mcore_pipeline_parallel
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import schedules as mcore_schedules
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_bitpipe.mcore import compat, cpu, forward_backward
from megatron_bitpipe.mcore.data import MockGPTData, forward_step
from megatron_bitpipe.mcore.export import full_parameters, gather_to_first_rank
from megatron_bitpipe.mcore.groups import (
    GradientGroups,
    assert_replicas_identical,
    create_gradient_groups,
    wrap_ddp,
)
from megatron_bitpipe.mcore.model import StageLayout, build_chunks, unwrap
from megatron_bitpipe.schedules import Action, render
from megatron_bitpipe.schedules.simulate import Event, peak_activations

if TYPE_CHECKING:
    from megatron_bitpipe.train import RunPlan

logger = logging.getLogger("megatron_bitpipe.train")


@dataclass
class _Session:
    """One schedule's model, optimizer and step function, built for ``args``."""

    args: argparse.Namespace
    plan: RunPlan
    model: list[Any]
    optimizer: Any
    groups: GradientGroups
    step: Callable[..., list[Any]]

    @property
    def tied(self) -> bool:
        return not self.args.untie_embeddings_and_output_weights

    def data(self, num_iterations: int, first_iteration: int = 0) -> Any:
        """The mock data iterator, in the form the step function wants (a list for megatron VP)."""
        iterator = MockGPTData(
            seed=self.args.seed,
            vocab_size=self.args.vocab_size,
            seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size,
            num_microbatches=self.plan.num_microbatches,
            data_parallel_rank=parallel_state.get_data_parallel_rank(),
            data_parallel_size=self.plan.data_parallel_size,
        ).iterator(num_iterations, first_iteration)
        return [iterator] * len(self.model) if self.plan.virtual_size else iterator

    def run_step(self, data_iterator: Any, *, forward_only: bool) -> list[Any]:
        return self.step(
            forward_step_func=forward_step,
            data_iterator=data_iterator,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.plan.num_microbatches,
            seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size,
            decoder_seq_length=self.args.seq_length,
            forward_only=forward_only,
        )


def run(args: argparse.Namespace, plans: Sequence[RunPlan]) -> int:
    """Train each plan (one per schedule) in turn in one process group; 0 on success."""
    _init_distributed(args)
    _configure_logging()
    for plan in plans:
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
        if len(plans) > 1:
            _log(f"schedule {plan.schedule}")
        _run_schedule(_build(args, plan))
    dist.destroy_process_group()
    return 0


def _run_schedule(session: _Session) -> None:
    """Train, evaluate, check the replicas, save; uninstall the schedule afterwards."""
    args, plan = session.args, session.plan
    losses, first_gradients = _train(session)
    if plan.uses_registry:
        _check_stash_against_simulation(session)
    validation = _evaluate(session) if args.eval_iters else None
    assert_replicas_identical(session.model, session.groups)
    if plan.placement.num_pipelines > 1:
        _log("the replicas of every stage are bitwise identical")
    if args.save_params:
        parameters = gather_to_first_rank(
            full_parameters(session.model, plan.placement, tied=session.tied)
        )
        reported = [(losses, validation)]
        dist.broadcast_object_list(reported, src=dist.get_world_size() - 1)
        if dist.get_rank() == 0:
            saved = {
                "parameters": parameters,
                "first_gradients": first_gradients,
                "lm_loss": reported[0][0],
                "validation_lm_loss": reported[0][1],
            }
            torch.save(saved, plan.output_path(args.save_params))
    forward_backward.uninstall()


def _check_stash_against_simulation(session: _Session) -> None:
    """The most activations any rank stashed in the last step equals the simulator's prediction."""
    plan = session.plan
    choice = forward_backward.ScheduleChoice(plan.schedule, tuple(plan.schedule_options))
    schedule, _ = forward_backward.plan(choice, plan.placement.num_ranks, plan.num_microbatches)
    executor = forward_backward.last_executor()
    assert executor is not None
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    measured: list[int] = [0] * pp_group.size()
    dist.all_gather_object(measured, executor.peak_live_activations, group=pp_group)
    simulated = list(peak_activations(schedule))
    _log(f"stashed activations per pipeline rank: measured {measured}, simulated {simulated}")
    if measured != simulated:
        raise RuntimeError(
            f"{plan.schedule}: measured stash peaks {measured} differ from the simulated {simulated}"
        )


def _build(args: argparse.Namespace, plan: RunPlan) -> _Session:
    config = _transformer_config(args, plan)
    chunks = build_chunks(
        config,
        plan.placement,
        vocab_size=args.vocab_size,
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        seed=args.seed,
    )
    if args.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    groups = create_gradient_groups(plan.placement)
    assert_replicas_identical(chunks, groups)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    model = wrap_ddp(chunks, config, ddp_config, groups)
    config.no_sync_func = [chunk.no_sync for chunk in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return _Session(
        args, plan, model, _optimizer(args, model, plan), groups, _forward_backward_func(plan)
    )


def _train(session: _Session) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Every iteration's reported loss, and (for --save-params) iteration 1's gradients."""
    args, plan = session.args, session.plan
    data_iterator = session.data(args.train_iters)
    losses: list[float] = []
    first_gradients: dict[str, torch.Tensor] = {}
    for iteration in range(1, args.train_iters + 1):
        traced = args.trace and plan.uses_registry and iteration == args.train_iters
        trace_origin = _trace_origin() if traced else None
        started = time.perf_counter()
        for chunk in session.model:
            chunk.zero_grad_buffer()
        session.optimizer.zero_grad()
        loss = _average_loss(session.run_step(data_iterator, forward_only=False))
        if iteration == 1 and args.save_params and not args.use_distributed_optimizer:
            gradients = full_parameters(
                session.model, plan.placement, tied=session.tied, gradients=True
            )
            first_gradients = gather_to_first_rank(gradients)
        session.optimizer.step()
        elapsed_ms = (time.perf_counter() - started) * 1e3
        if loss is not None:
            losses.append(loss)
        _log(_format_log_line(session, iteration, elapsed_ms, loss))
        if trace_origin is not None:
            _write_trace(plan.output_path(args.trace), trace_origin, plan)
    return losses, first_gradients


@torch.no_grad()
def _evaluate(session: _Session) -> float | None:
    """Mean loss of ``--eval-iters`` forward-only steps on batches after the training ones."""
    args = session.args
    data_iterator = session.data(args.eval_iters, first_iteration=args.train_iters)
    losses = [
        _average_loss(session.run_step(data_iterator, forward_only=True))
        for _ in range(args.eval_iters)
    ]
    if losses[0] is None:
        return None
    value = sum(losses) / len(losses)
    _log(
        f" validation loss at iteration {args.train_iters} | lm loss value: {value:.6E} | "
        f"lm loss PPL: {math.exp(min(20.0, value)):.6E} |"
    )
    return value


def _init_distributed(args: argparse.Namespace) -> None:
    """CPU workarounds (without CUDA), the process group, megatron's parallel state."""
    compat.check_version()
    cpu.apply()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO if _is_logging_rank() else logging.WARNING)


def _is_logging_rank() -> bool:
    """Megatron-LM's print_rank_last: the last global rank (last pipeline stage)."""
    return dist.get_rank() == dist.get_world_size() - 1


def _log(line: str) -> None:
    if _is_logging_rank():
        logger.info(line)


def _transformer_config(args: argparse.Namespace, plan: RunPlan) -> TransformerConfig:
    virtual_size = plan.virtual_size
    if plan.uses_registry:
        virtual_size = StageLayout(plan.placement, args.num_layers).virtual_size()
    interleaved_on_two = (
        plan.schedule == "megatron-interleaved" and args.pipeline_model_parallel_size == 2
    )
    settings: dict[str, Any] = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_size,
        sequence_parallel=args.sequence_parallel,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        use_cpu_initialization=True,
        bf16=args.bf16,
        params_dtype=_dtype(args),
        pipeline_dtype=_dtype(args),
        deallocate_pipeline_outputs=True,
        # megatron-core mixes same-peer messages of batched p2p with PP=2 (Megatron-LM#750)
        overlap_p2p_comm=interleaved_on_two,
        batch_p2p_comm=not interleaved_on_two,
    )
    settings.update(cpu.config_overrides())
    return TransformerConfig(**settings)


def _dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float32


def _optimizer(args: argparse.Namespace, model: list[Any], plan: RunPlan) -> Any:
    clip_grad = args.clip_grad if torch.cuda.is_available() else 0.0
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.lr,
        weight_decay=args.weight_decay,
        adam_eps=args.adam_eps,
        clip_grad=clip_grad,
        bf16=args.bf16,
        params_dtype=_dtype(args),
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    # The two replicas of a stage gather parameters in one shared order: stage position.
    placement = plan.placement
    ordered = sorted(model, key=lambda chunk: placement.position(unwrap(chunk).bitpipe_stage))
    return get_megatron_optimizer(config, ordered)


def _forward_backward_func(plan: RunPlan) -> Callable[..., list[Any]]:
    """Ours through the installed hook, or megatron's own for megatron-* and none."""
    if plan.uses_registry:
        forward_backward.install(plan.schedule, **dict(plan.schedule_options))
        return mcore_pipeline_parallel.get_forward_backward_func()
    return mcore_schedules.get_forward_backward_func(plan.placement.num_ranks, plan.virtual_size)


def _average_loss(reported: list[Any]) -> float | None:
    """Mean 'lm loss' over the step's microbatches and data-parallel ranks (loss ranks only)."""
    if not reported:
        return None
    loss = torch.stack([item["lm loss"].float() for item in reported]).mean().reshape(1)
    group = parallel_state.get_data_parallel_group()
    dist.all_reduce(loss, group=group)
    return float(loss.item()) / group.size()


def _format_log_line(
    session: _Session, iteration: int, elapsed_ms: float, loss: float | None
) -> str:
    """One Megatron-LM training log line."""
    args = session.args
    text = f" [{time.strftime('%Y-%m-%d %H:%M:%S')}]"
    text += f" iteration {iteration:8d}/{args.train_iters:8d} |"
    text += f" consumed samples: {iteration * args.global_batch_size:12d} |"
    text += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    text += f" learning rate: {session.optimizer.param_groups[0]['lr']:.6E} |"
    text += f" global batch size: {args.global_batch_size:5d} |"
    if loss is not None:
        text += f" lm loss: {loss:.6E} |"
    text += " loss scale: 1.0 | number of skipped iterations:   0 | number of nan iterations:   0 |"
    return text


def _trace_origin() -> float:
    dist.barrier()
    return time.perf_counter()


def _write_trace(path: str, origin: float, plan: RunPlan) -> None:
    """Every rank's measured compute spans of the last step (one track per global rank), written
    by rank 0 as Chrome trace JSON to ``path`` and, with matplotlib, as a timeline PNG beside it."""
    executor = forward_backward.last_executor()
    trace = executor.trace if executor is not None else []
    spans = [
        (str(event.action), event.start - origin, event.end - origin)
        for event in trace
        if event.action.is_compute
    ]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.gather_object(spans, everyone if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() != 0:
        return
    events = [
        Event(rank, Action.parse(action), start, end)
        for rank, part in enumerate(everyone)
        for action, start, end in part
    ]
    name = f"{plan.schedule} (measured)"
    placement = plan.placement
    render.write_chrome_trace(
        path, events, name=name, placement=placement, time_unit=render.SECONDS
    )
    in_ms = [Event(e.rank, e.action, e.start * 1e3, e.end * 1e3) for e in events]
    try:
        render.plot_png(
            render.measured_result(name, in_ms),
            os.path.splitext(path)[0] + ".png",
            title=f"{name}, ms",
            placement=placement,
        )
    except ImportError as error:
        logger.warning("no timeline PNG: %s", error)
