"""The megatron-core side of ``megatron_bitpipe.train``: groups, model, optimizer, the loop.

``run(args, plans)`` takes arguments already checked by ``run_plan.validate_args``. With
``--report`` the logging rank also writes the run's figures (``megatron_bitpipe.run_report``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import megatron.core.pipeline_parallel as mcore_pipeline_parallel
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import schedules as mcore_schedules
from megatron.core.transformer import TransformerConfig

from megatron_bitpipe.mcore import (
    checkpointing,
    compat,
    cpu,
    diagnostics,
    dropout,
    forward_backward,
    guards,
    step_profile,
)
from megatron_bitpipe.mcore.communication import (
    WAITS_VARIABLE,
    release_communication,
    setup_communication,
)
from megatron_bitpipe.mcore.data import MockGPTData, forward_step
from megatron_bitpipe.mcore.export import full_parameters, gather_to_first_rank
from megatron_bitpipe.mcore.groups import (
    GradientGroups,
    assert_replicas_identical,
    create_gradient_groups,
    mark_replica_duplicates,
    wrap_ddp,
)
from megatron_bitpipe.mcore.model import StageLayout, build_chunks, unwrap
from megatron_bitpipe.mcore.precision import wrap_half_precision
from megatron_bitpipe.mcore.reporting import (
    IterationReport,
    configure_logging,
    is_logging_rank,
    log,
    per_rank,
    write_trace,
)
from megatron_bitpipe.run_plan import RunPlan
from megatron_bitpipe.run_report import ReportWriter
from megatron_bitpipe.runtime import faults
from megatron_bitpipe.runtime.channels import CommunicatorSetupError
from megatron_bitpipe.runtime.deadline import Deadline, PhaseError
from megatron_bitpipe.runtime.errors import P2PError
from megatron_bitpipe.runtime.rank_order import LAUNCH_RANK_VARIABLE
from megatron_bitpipe.runtime.watchdog import exit_process
from megatron_bitpipe.schedules import rank_order
from megatron_bitpipe.schedules.simulate import peak_activations


@dataclass
class _Session:
    """One schedule's model, optimizer and step function, built for ``args``."""

    args: argparse.Namespace
    plan: RunPlan
    model: list[Any]
    optimizer: Any
    groups: GradientGroups
    step: Callable[..., list[Any]]
    deadline: Deadline
    findings: diagnostics.Findings = field(default_factory=diagnostics.Findings)

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


ONE_LINE_ERRORS = (P2PError, PhaseError, CommunicatorSetupError, guards.TrainingStopped)
"""Failures reported as one line naming the rank and what failed (no traceback)."""


def run(args: argparse.Namespace, plans: Sequence[RunPlan]) -> int:
    """Train each plan (one per schedule) in turn in one process group; 0 on success.

    Every phase has a deadline (``--distributed-timeout-minutes`` for set-up, collectives and
    checkpoints; ``--step-timeout-seconds`` for each action of a step and the optimizer step):
    a rank that overruns one, or whose peer died, prints one line and exits non-zero.
    """
    rank = int(os.environ.get("RANK", "0"))
    deadline = Deadline(rank)
    try:
        faults.trigger("setup", rank=rank)
        others = int(os.environ.get("WORLD_SIZE", "1")) - 1
        rendezvous = (
            f"{others} other rank{'s' if others != 1 else ''} at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        )
        with deadline.phase(
            "set-up: rendezvous and process groups", _setup_seconds(args), waiting=lambda: rendezvous
        ):
            _init_distributed(args)
        configure_logging()
        _log_rank_order(args)
        report = ReportWriter(args.report if is_logging_rank() else None, _report_settings(args, plans))
        for plan in plans:
            tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
            if len(plans) > 1:
                log(f"schedule {plan.schedule}")
            report.start_schedule(plan.schedule, dict(plan.schedule_options))
            with deadline.phase(f"set-up of {plan.schedule}: model and communicators", _setup_seconds(args)):
                session = _build(args, plan, deadline)
            _run_schedule(session, report)
        report.finish()
    except ONE_LINE_ERRORS as error:
        exit_process(str(error).splitlines()[0])
    dist.destroy_process_group()
    return 0


def _report_settings(args: argparse.Namespace, plans: Sequence[RunPlan]) -> dict[str, Any]:
    """The run's settings as ``--report`` records them (shared by every schedule)."""
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return {
        "world_size": plans[0].world_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "data_parallel_size": plans[0].data_parallel_size,
        "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
        "num_microbatches": plans[0].num_microbatches,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "seq_length": args.seq_length,
        "train_iters": args.train_iters,
        "eval_iters": args.eval_iters,
        "precision": precision,
        "schedules": [plan.schedule for plan in plans],
    }


def _setup_seconds(args: argparse.Namespace) -> float:
    return args.distributed_timeout_minutes * 60.0


def _group_timeout(args: argparse.Namespace) -> timedelta:
    """The timeout of every process group: ``--distributed-timeout-minutes``."""
    return timedelta(minutes=args.distributed_timeout_minutes)


def _run_schedule(session: _Session, report: ReportWriter) -> None:
    """Train, evaluate, check the replicas, save; uninstall the schedule and destroy its
    channels afterwards (the next schedule of a comma list makes its own)."""
    args, plan = session.args, session.plan
    losses, first_gradients = _train(session, report)
    if plan.uses_registry:
        measured, simulated = _check_stash_against_simulation(session)
        report.update(stashed_activations={"measured": measured, "simulated": simulated})
    if args.measure_memory:
        peaks, held = diagnostics.report_memory(session.findings, registry=plan.uses_registry)
        report.update(peak_memory_bytes=peaks, held_send_bytes=held)
    if args.check_host_syncs:
        diagnostics.report_host_syncs(session.findings, plan.schedule, args.train_iters)
        report.update(host_syncs=0)  # report_host_syncs raised at any
    validation = _evaluate(session) if args.eval_iters else None
    report.update(validation_lm_loss=validation)
    assert_replicas_identical(session.model, session.groups)
    if plan.placement.num_pipelines > 1:
        log("the replicas of every stage are bitwise identical")
        report.update(replicas_identical=True)
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
    release_communication()
    report.finish_schedule()


def _check_stash_against_simulation(session: _Session) -> tuple[list[int], list[int]]:
    """The most activations each pipeline rank stashed in the last step, measured and simulated;
    raise unless they are equal."""
    plan = session.plan
    assert plan.built is not None
    executor = forward_backward.last_executor()
    assert executor is not None
    measured = per_rank(
        executor.peak_live_activations, parallel_state.get_pipeline_model_parallel_group()
    )
    simulated = list(peak_activations(plan.built))
    log(f"stashed activations per pipeline rank: measured {measured}, simulated {simulated}")
    if measured != simulated:
        raise RuntimeError(
            f"{plan.schedule}: measured stash peaks {measured} differ from the simulated {simulated}"
        )
    return measured, simulated


def _build(args: argparse.Namespace, plan: RunPlan, deadline: Deadline) -> _Session:
    config = _transformer_config(args, plan)
    chunks = build_chunks(
        config,
        plan.placement,
        vocab_size=args.vocab_size,
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        seed=args.seed,
    )
    # before Float16Module and DDP: DDP allocates its buffers on the chunk's current device
    device = cpu.compute_device()
    chunks = wrap_half_precision([chunk.to(device) for chunk in chunks], config)
    groups = create_gradient_groups(plan.placement, timeout=_group_timeout(args))
    assert_replicas_identical(chunks, groups)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    model = wrap_ddp(chunks, config, ddp_config, groups)
    config.no_sync_func = [chunk.no_sync for chunk in model] if len(model) > 1 else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    mark_replica_duplicates(
        model, plan.placement, distributed_optimizer=args.use_distributed_optimizer
    )
    optimizer = _optimizer(args, model, plan)
    config.grad_scale_func = optimizer.scale_loss
    if plan.uses_registry:
        setup_communication(
            plan.placement,
            groups,
            timeout_s=args.step_timeout_seconds,
            group_timeout=_group_timeout(args),
        )
    step = _forward_backward_func(plan)
    return _Session(args, plan, model, optimizer, groups, step, deadline)


def _train(session: _Session, report: ReportWriter) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Every iteration's reported loss, and (for --save-params) iteration 1's gradients; each
    logged iteration also goes to ``report``."""
    args, plan = session.args, session.plan
    start = 0
    if args.load:
        start = checkpointing.load_checkpoint(args.load, session.model, session.optimizer)
        log(f" loaded checkpoint from {args.load} at iteration {start}")
    data_iterator = session.data(args.train_iters - start, first_iteration=start)
    losses: list[float] = []
    first_gradients: dict[str, torch.Tensor] = {}
    profiled_steps: list[dict[str, Any]] = []
    for iteration in range(start + 1, args.train_iters + 1):
        dropout.set_step(iteration - 1)  # resumed or not, iteration k draws the same masks
        traced = args.trace and plan.uses_registry and iteration == args.train_iters
        profiled = args.profile_step and 2 <= iteration <= _profiled_iteration(args)
        trace_origin = _trace_origin() if traced or profiled else None
        started = time.perf_counter()
        for chunk in session.model:
            chunk.zero_grad_buffer()
        session.optimizer.zero_grad()
        step_phase = guards.step_phase(session.deadline, iteration, args.step_timeout_seconds)
        checks = diagnostics.step_checks(args, iteration, session.findings)
        with step_phase, checks, forward_backward.tracing(bool(traced or profiled), cpu_time=bool(profiled)):
            faults.trigger("step", rank=dist.get_rank(), iteration=iteration)
            reported = session.run_step(data_iterator, forward_only=False)
        loss = _average_loss(reported)
        if iteration == 1 and args.save_params and not args.use_distributed_optimizer:
            gradients = full_parameters(
                session.model, plan.placement, tied=session.tied, gradients=True
            )
            first_gradients = gather_to_first_rank(gradients)
        optimizer_started = time.perf_counter()
        with guards.optimizer_phase(session.deadline, iteration, args.step_timeout_seconds):
            faults.trigger("optimizer", rank=dist.get_rank(), iteration=iteration)
            finite = guards.all_finite(session.model, loss, gradients=not args.fp16)
            if finite:
                updated, grad_norm, _ = session.optimizer.step()
            else:
                updated, grad_norm = False, None
                guards.on_non_finite(iteration, loss, stop=args.exit_on_nan)
        optimizer_s = time.perf_counter() - optimizer_started
        guards.perturb_if_planned(session.model, iteration)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        if loss is not None:
            losses.append(loss)
        logged = IterationReport(
            iteration=iteration,
            train_iters=args.train_iters,
            global_batch_size=args.global_batch_size,
            elapsed_ms=elapsed_ms,
            learning_rate=session.optimizer.param_groups[0]["lr"],
            loss=loss,
            loss_scale=float(session.optimizer.get_loss_scale()),
            grad_norm=None if grad_norm is None else float(grad_norm),
            skipped=not updated,
            nan=not finite,
        )
        log(logged.line())
        if traced:
            _write_trace(plan.output_path(args.trace), trace_origin, plan)
            report.update(trace=plan.output_path(args.trace))
        report.add_iteration(logged.record())
        if profiled:
            profiled_steps.append(_profiled_step(session, iteration, trace_origin, optimizer_s, elapsed_ms / 1e3))
            if iteration == _profiled_iteration(args):
                _write_step_profile(session, profiled_steps)
        if args.check_replicas_every and iteration % args.check_replicas_every == 0:
            guards.check_replicas(session.model, session.groups, iteration)
        interval = args.save_interval or args.train_iters
        if args.save and (iteration % interval == 0 or iteration == args.train_iters):
            with session.deadline.phase(f"checkpoint save of iteration {iteration}", _setup_seconds(args)):
                folder = checkpointing.save_checkpoint(
                    plan.output_path(args.save), iteration, session.model, session.optimizer
                )
            log(f" saved checkpoint at iteration {iteration} to {folder}")
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
    log(
        f" validation loss at iteration {args.train_iters} | lm loss value: {value:.6E} | "
        f"lm loss PPL: {math.exp(min(20.0, value)):.6E} |"
    )
    return value


def _log_rank_order(args: argparse.Namespace) -> None:
    order = getattr(args, "pipeline_rank_order", rank_order.CONSECUTIVE)
    if order != rank_order.CONSECUTIVE:
        pp = args.pipeline_model_parallel_size
        slots = [rank_order.slot_of(rank, pp, order) for rank in range(pp)]
        launched = per_rank(int(os.environ.get(LAUNCH_RANK_VARIABLE, dist.get_rank())))
        log(
            f"pipeline rank order {order}: pipeline ranks 0-{pp - 1} run in process slots {slots}; "
            f"launch rank of each global rank: {launched}"
        )


def _init_distributed(args: argparse.Namespace) -> None:
    """CPU workarounds (without CUDA), the process group, megatron's parallel state.

    ``--check-host-syncs`` audits NCCL's wait path (``watchdog``) on gloo as well.
    """
    compat.check_version()
    cpu.apply()
    if args.check_host_syncs:
        os.environ.setdefault(WAITS_VARIABLE, "watchdog")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = _group_timeout(args)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        distributed_timeout_minutes=max(1, math.ceil(args.distributed_timeout_minutes)),
    )


def _transformer_config(args: argparse.Namespace, plan: RunPlan) -> TransformerConfig:
    virtual_size = plan.virtual_size
    if plan.uses_registry:
        virtual_size = StageLayout(plan.placement, args.num_layers).virtual_size()
    interleaved_on_two = (
        plan.choice.is_megatron
        and plan.choice.takes_virtual_size
        and args.pipeline_model_parallel_size == 2
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
        fp16=args.fp16,
        params_dtype=_dtype(args),
        pipeline_dtype=_dtype(args),
        deallocate_pipeline_outputs=True,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        # megatron-core mixes same-peer messages of batched p2p with PP=2 (Megatron-LM#750)
        overlap_p2p_comm=interleaved_on_two,
        batch_p2p_comm=not interleaved_on_two,
    )
    settings.update(cpu.config_overrides(overlap_p2p_comm=interleaved_on_two))
    return TransformerConfig(**settings)


def _dtype(args: argparse.Namespace) -> torch.dtype:
    if args.bf16:
        return torch.bfloat16
    return torch.float16 if args.fp16 else torch.float32


def _optimizer(args: argparse.Namespace, model: list[Any], plan: RunPlan) -> Any:
    """megatron's Adam: fp32 main parameters for bf16/fp16, dynamic loss scaling for fp16."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.lr,
        weight_decay=args.weight_decay,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        params_dtype=_dtype(args),
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    # The two replicas of a stage gather parameters in one shared order: stage position.
    placement = plan.placement
    ordered = sorted(model, key=lambda chunk: placement.position(unwrap(chunk).bitpipe_stage))
    optimizer = get_megatron_optimizer(config, ordered)
    checkpointing.share_optimizer_keys_with_replicas(optimizer, placement)
    return optimizer


def _forward_backward_func(plan: RunPlan) -> Callable[..., list[Any]]:
    """Ours through the installed hook, or megatron's own for megatron-* and none."""
    if plan.uses_registry:
        forward_backward.install(plan.choice)
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


def _profiled_iteration(args: argparse.Namespace) -> int:
    """The last iteration ``--profile-step`` measures (it measures every one from the second):
    the last, or the one before it when the last is measured for memory (under torch's
    profiler on a CPU)."""
    return args.train_iters - 1 if args.measure_memory and args.train_iters > 2 else args.train_iters


def _profiled_step(
    session: _Session, iteration: int, origin: float, optimizer_s: float, step_s: float
) -> dict[str, Any]:
    """This rank's measured ``iteration`` for ``--profile-step``."""
    return step_profile.step_record(
        iteration,
        origin,
        forward_backward.last_finalize_seconds() if session.plan.uses_registry else 0.0,
        optimizer_s,
        step_s,
        traced=session.plan.uses_registry,
    )


def _write_step_profile(session: _Session, steps: list[dict[str, Any]]) -> None:
    """``--profile-step``: the measured steps, then the message and sync calibrations."""
    args, plan = session.args, session.plan
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    config = session.model[0].config
    activation_numel = args.seq_length * args.micro_batch_size * args.hidden_size
    if config.sequence_parallel:  # each tensor-parallel rank sends its share of the sequence
        activation_numel //= parallel_state.get_tensor_model_parallel_world_size()
    dtype = config.pipeline_dtype or config.params_dtype
    message = step_profile.calibrate_messages(activation_numel, dtype)
    record = step_profile.rank_record(
        session.model,
        plan.placement.rank_stages[pp_rank],
        steps,
        message,
        step_profile.calibrate_sync(session.model, session.groups.group),
    )
    header = {
        "schedule": plan.schedule,
        "options": dict(plan.schedule_options),
        "num_ranks": plan.placement.num_ranks,
        "num_pipelines": plan.placement.num_pipelines,
        "num_microbatches": plan.num_microbatches,
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size,
        "num_attention_heads": args.num_attention_heads,
        "virtual_size": plan.virtual_size,
        "activation_bytes": activation_numel * torch.tensor([], dtype=dtype).element_size(),
        "cpu_time": not torch.cuda.is_available(),
    }
    step_profile.write(plan.output_path(args.profile_step), header, record)


def _trace_origin() -> float:
    dist.barrier()
    return time.perf_counter()


def _write_trace(path: str, origin: float, plan: RunPlan) -> None:
    """Every rank's measured compute spans of the last step, relative to ``origin``."""
    executor = forward_backward.last_executor()
    trace = executor.trace if executor is not None else []
    spans = [
        (str(event.action), event.start - origin, event.end - origin)
        for event in trace
        if event.action.is_compute
    ]
    write_trace(path, spans, f"{plan.schedule} (measured)", plan.placement)
