"""Validated run settings: which schedule, placement and microbatch count the arguments give.

One module for the rules, shared by our trainer (``megatron_bitpipe.train``) and the Megatron-LM
launcher (``megatron_bitpipe.megatron_lm``): every setting is checked here, before any process
group exists, and a bad one raises ``ArgumentsError`` naming the setting and the rule.
``args`` uses Megatron-LM's argument names (an ``argparse.Namespace``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

from megatron_bitpipe.runtime import nccl_rules
from megatron_bitpipe.schedules import ScheduleConfigError, Schedule, get, lower, names
from megatron_bitpipe.schedules import rank_order
from megatron_bitpipe.schedules.choice import ScheduleChoice, known_names, parse
from megatron_bitpipe.schedules.flags import TRAINER, flag, words
from megatron_bitpipe.schedules.placement import Placement


class ArgumentsError(ValueError):
    """A setting that cannot run; the message names the setting and the rule."""


@dataclass(frozen=True)
class RunPlan:
    """What the validated arguments resolve to."""

    world_size: int
    data_parallel_size: int
    num_microbatches: int
    choice: ScheduleChoice
    placement: Placement
    built: Schedule | None
    """The validated schedule the run executes (megatron's checked twin for its own; else None)."""

    @property
    def schedule(self) -> str:
        """The schedule's name."""
        return self.choice.name

    @property
    def schedule_options(self) -> tuple[tuple[str, Any], ...]:
        """The registry schedule's options; () for megatron-core's own functions."""
        return () if self.choice.is_megatron else self.choice.options

    @property
    def virtual_size(self) -> int | None:
        """megatron's interleaved vp (parallel_state and config), else None."""
        return self.choice.option("vp") if self.choice.is_megatron else None

    @property
    def uses_registry(self) -> bool:
        return self.choice.uses_registry

    def output_path(self, template: str) -> str:
        """``template`` with ``{schedule}`` replaced by this plan's schedule name."""
        return template.replace("{schedule}", self.schedule)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and value >= 1


def _non_negative_int(value: object) -> bool:
    return isinstance(value, int) and value >= 0


def _finite(low: float, *, strict: bool = False, high: float | None = None):
    def rule(value: object) -> bool:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > low if strict else value >= low
        return above and (high is None or value < high)

    return rule


RANGES: tuple[tuple[str, str, Any], ...] = (
    ("--pipeline-model-parallel-size", "an integer >= 1", _positive_int),
    ("--tensor-model-parallel-size", "an integer >= 1", _positive_int),
    ("--virtual-pipeline-model-parallel-size", "an integer >= 1", _positive_int),
    ("--num-layers-per-virtual-pipeline-stage", "an integer >= 1", _positive_int),
    ("--microbatch-group-size-per-virtual-pipeline-stage", "an integer >= 1", _positive_int),
    ("--max-inflight", "an integer >= 1", _positive_int),
    ("--max-stash", "an integer >= 1", _positive_int),
    ("--num-layers", "an integer >= 1", _positive_int),
    ("--recompute-num-layers", "an integer >= 1", _positive_int),
    ("--hidden-size", "an integer >= 1", _positive_int),
    ("--ffn-hidden-size", "an integer >= 1", _positive_int),
    ("--num-attention-heads", "an integer >= 1", _positive_int),
    ("--seq-length", "an integer >= 1", _positive_int),
    ("--max-position-embeddings", "an integer >= 1", _positive_int),
    ("--vocab-size", "an integer >= 1", _positive_int),
    ("--micro-batch-size", "an integer >= 1", _positive_int),
    ("--global-batch-size", "an integer >= 1", _positive_int),
    ("--train-iters", "an integer >= 1", _positive_int),
    ("--eval-iters", "an integer >= 0", _non_negative_int),
    ("--save-interval", "an integer >= 1", _positive_int),
    ("--check-replicas-every", "an integer >= 1", _positive_int),
    ("--lr", "a finite number >= 0", _finite(0.0)),
    ("--weight-decay", "a finite number >= 0", _finite(0.0)),
    ("--adam-eps", "a finite number > 0", _finite(0.0, strict=True)),
    ("--clip-grad", "a finite number >= 0", _finite(0.0)),
    ("--hidden-dropout", "a number in [0, 1)", _finite(0.0, high=1.0)),
    ("--attention-dropout", "a number in [0, 1)", _finite(0.0, high=1.0)),
    ("--loss-scale", "a finite number > 0", _finite(0.0, strict=True)),
    ("--initial-loss-scale", "a finite number > 0", _finite(0.0, strict=True)),
    ("--min-loss-scale", "a finite number > 0", _finite(0.0, strict=True)),
    ("--loss-scale-window", "a finite number >= 1", _finite(1.0)),
    ("--hysteresis", "an integer >= 1", _positive_int),
    ("--distributed-timeout-minutes", "a finite number > 0", _finite(0.0, strict=True)),
    ("--step-timeout-seconds", "a finite number > 0", _finite(0.0, strict=True)),
)
"""Every numeric setting's range: (flag, rule, test). Settings absent or None are not checked."""


def check_ranges(args: argparse.Namespace) -> None:
    """Raise ArgumentsError for the first setting outside its range, naming flag, value, rule."""
    for flag, rule, test in RANGES:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None and not test(value):
            raise ArgumentsError(f"{flag} {value}: must be {rule}")


def validate_args(
    args: argparse.Namespace, world_size: int, front_end: str = TRAINER
) -> list[RunPlan]:
    """Check every rule that needs no process group; raise ArgumentsError naming the setting
    (a schedule's own rules in ``front_end``'s flags: ``schedules.flags``).

    ``--pipeline-schedule`` may list several schedules (comma separated): they run one after
    the other in one process group, each from the same initial weights and data.
    """
    check_ranges(args)
    check_recompute(args)
    try:
        rank_order.check_order(
            getattr(args, "pipeline_rank_order", rank_order.CONSECUTIVE), args.pipeline_model_parallel_size
        )
    except ValueError as error:
        raise ArgumentsError(str(error)) from None
    schedules = parse(args.pipeline_schedule)
    _require(bool(schedules), "--pipeline-schedule needs at least one schedule name")
    _require(
        args.trace is None or any(choice.uses_registry for choice in schedules),
        f"--trace records the runtime executor; --pipeline-schedule {args.pipeline_schedule} "
        f"does not use it (megatron-core's own functions are not traced)",
    )
    if len(schedules) > 1:
        for flag, value in (("--save-params", args.save_params), ("--trace", args.trace)):
            _require(
                value is None or "{schedule}" in value,
                f"{flag} {value} must contain {{schedule}} when several schedules run",
            )
    if len(schedules) > 1:
        # a virtual size given for a list applies to the schedules that take one
        _require(
            any(choice.takes_virtual_size for choice in schedules)
            or _virtual_size(args, args.pipeline_model_parallel_size) is None,
            "--virtual-pipeline-model-parallel-size: no listed schedule takes a virtual size",
        )
        return [
            _validate_schedule(
                _without_virtual_size(args, not choice.takes_virtual_size),
                world_size,
                choice,
                front_end,
            )
            for choice in schedules
        ]
    return [_validate_schedule(args, world_size, schedules[0], front_end)]


def _without_virtual_size(args: argparse.Namespace, drop: bool) -> argparse.Namespace:
    if not drop:
        return args
    return argparse.Namespace(
        **{
            **vars(args),
            "virtual_pipeline_model_parallel_size": None,
            "num_layers_per_virtual_pipeline_stage": None,
        }
    )


def _validate_schedule(
    args: argparse.Namespace, world_size: int, choice: ScheduleChoice, front_end: str
) -> RunPlan:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _require(tp >= 1 and pp >= 1, "--tensor/--pipeline-model-parallel-size must be >= 1")
    _require(
        world_size % (tp * pp) == 0,
        f"world size {world_size} must be divisible by "
        f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}",
    )
    dp = world_size // (tp * pp)
    per_step = args.micro_batch_size * dp
    if args.global_batch_size is None:  # Megatron-LM's default: one microbatch per rank
        args = argparse.Namespace(**{**vars(args), "global_batch_size": per_step})
    _require(
        args.global_batch_size % per_step == 0,
        f"--global-batch-size {args.global_batch_size} must be divisible by "
        f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}",
    )
    _check_model_shape(args, tp)
    _require(not (args.bf16 and args.fp16), "--bf16 and --fp16 exclude each other")
    checkpoints = getattr(args, "save", None) or getattr(args, "load", None)
    _require(
        not checkpoints or _importable("psutil"),
        "--save/--load need psutil (megatron-core's checkpoint writer uses it): pip install psutil",
    )
    _require(
        not (checkpoints and args.use_distributed_optimizer and not _has_fused_adam()),
        "--save/--load with --use-distributed-optimizer needs apex or Transformer Engine: "
        "without them megatron-core 0.16.1 restores torch Adam's state wrongly (the second "
        "iteration after loading differs)",
    )
    num_microbatches = args.global_batch_size // per_step
    choice = _resolve_schedule(args, choice, pp)
    built = _plan(choice, pp, num_microbatches, front_end)
    if choice.uses_registry:
        check_nccl_order(built, os.environ.get(CONNECTIONS_VARIABLE))
    placement = choice.placement(pp, num_microbatches)
    check_features(args, choice, placement)
    stages = placement.stages_per_pipeline
    _require(args.num_layers is not None, "--num-layers is required")
    _require(
        args.num_layers % stages == 0,
        f"--num-layers {args.num_layers} must be divisible by the "
        f"{stages} stages per pipeline of {choice} (placement {placement.kind}, PP={pp})",
    )
    return RunPlan(world_size, dp, num_microbatches, choice, placement, built)


def _resolve_schedule(args: argparse.Namespace, choice: ScheduleChoice, pp: int) -> ScheduleChoice:
    """``choice`` with the options the arguments give it; ArgumentsError for one it refuses."""
    vp = _virtual_size(args, pp)
    if choice.is_reference:
        _require(
            pp == 1, f"--pipeline-schedule {choice} needs --pipeline-model-parallel-size 1, got {pp}"
        )
        return choice
    if choice.is_megatron and not choice.takes_virtual_size:
        _require(vp is None, f"--pipeline-schedule {choice} takes no virtual pipeline size")
        return choice
    if choice.is_megatron:
        _require(
            vp is not None,
            f"--pipeline-schedule {choice} needs "
            "--virtual-pipeline-model-parallel-size or --num-layers-per-virtual-pipeline-stage",
        )
        group = args.microbatch_group_size_per_virtual_pipeline_stage
        return choice.with_options(vp=vp, microbatch_group_size=group)
    return choice.with_options(**_registry_options(args, choice.name, vp))


CONNECTIONS_VARIABLE = "CUDA_DEVICE_MAX_CONNECTIONS"
CUDA_DEFAULT_CONNECTIONS = 8


def check_nccl_order(schedule: Schedule, connections: str | None) -> None:
    """Raise ArgumentsError if a step of ``schedule``, lowered as the runtime lowers it, could hang
    on NCCL with ``CUDA_DEVICE_MAX_CONNECTIONS=connections`` (None: CUDA's default of 8).

    ``runtime.nccl_rules`` replays the step under NCCL's and CUDA's rules. The lowering's one
    global order passes by construction; this refuses whatever would not, before it can hang.
    """
    _require(
        connections is None or (connections.isdigit() and int(connections) >= 1),
        f"{CONNECTIONS_VARIABLE}={connections}: must be an integer >= 1",
    )
    queues = CUDA_DEFAULT_CONNECTIONS if connections is None else int(connections)
    try:
        nccl_rules.check_first_step(lower(schedule, grad_sync=True), connections=queues)
    except (nccl_rules.NcclDeadlock, nccl_rules.NcclMismatch) as error:
        reason = str(error).split("; ")[0]
        raise ArgumentsError(
            f"{CONNECTIONS_VARIABLE}={connections or CUDA_DEFAULT_CONNECTIONS}: --pipeline-schedule "
            f"{schedule.name} at --pipeline-model-parallel-size {schedule.num_ranks} with "
            f"{schedule.num_microbatches} microbatches could hang on NCCL ({reason})"
        ) from None


def check_recompute(args: argparse.Namespace) -> None:
    """Megatron's recompute rules, as one line each: full needs a method and a layer count;
    selective takes neither. Settings absent from ``args`` count as off."""
    granularity = getattr(args, "recompute_granularity", None)
    method = getattr(args, "recompute_method", None)
    layers = getattr(args, "recompute_num_layers", None)
    _require(
        granularity == "full" or (method is None and layers is None),
        f"--recompute-method / --recompute-num-layers go with --recompute-granularity full, got "
        f"{granularity}",
    )
    _require(
        granularity != "full" or (method is not None and layers is not None),
        "--recompute-granularity full needs --recompute-method (uniform or block) and "
        "--recompute-num-layers",
    )


def check_features(args: argparse.Namespace, schedule: ScheduleChoice, placement: Placement) -> None:
    """Raise ArgumentsError for a Megatron feature the schedule's placement would run wrongly.

    The settings are Megatron-LM's (``num_experts``, ``calculate_per_token_loss``,
    ``variable_seq_lengths``); one absent from ``args`` counts as off, as in Megatron-LM.
    """
    experts = getattr(args, "num_experts", None)
    _require(
        not experts or placement.num_pipelines == 1,
        f"--num-experts {experts}: --pipeline-schedule {schedule} runs two pipeline replicas "
        "whose expert gradients megatron's expert data-parallel group cannot reduce (it lacks "
        "the partner rank D-1-r, so the expert copies drift apart); use a one-pipeline schedule",
    )
    last = placement.num_ranks - 1
    loss_ranks = sorted(placement.loss_ranks())
    _require(
        not getattr(args, "calculate_per_token_loss", False) or loss_ranks == [last],
        f"--calculate-per-token-loss: --pipeline-schedule {schedule} computes the loss on "
        f"pipeline ranks {loss_ranks}, but megatron's finalize_model_grads takes the token count "
        f"from the last pipeline rank {last} only (gradients would be summed, not averaged); use "
        "a schedule whose loss heads are on the last rank",
    )
    _require(
        not getattr(args, "variable_seq_lengths", False) or schedule.is_megatron,
        f"variable_seq_lengths: --pipeline-schedule {schedule} sends every activation in a buffer "
        "of the one shape --seq-length and --micro-batch-size give, and NCCL does not check "
        "shapes; use a fixed sequence length or a megatron-* schedule",
    )


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _has_fused_adam() -> bool:
    return _importable("apex") or _importable("transformer_engine")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ArgumentsError(message)


def _check_model_shape(args: argparse.Namespace, tp: int) -> None:
    """Divisibility rules of the model's sizes; a size left unset (None) is not checked."""
    hidden, heads, vocab = args.hidden_size, args.num_attention_heads, args.vocab_size
    if hidden is not None and heads is not None:
        _require(
            hidden % heads == 0,
            f"--hidden-size {hidden} must be divisible by --num-attention-heads {heads}",
        )
    if heads is not None:
        _require(
            heads % tp == 0,
            f"--num-attention-heads {heads} must be divisible by --tensor-model-parallel-size {tp}",
        )
    if vocab is not None:
        _require(
            vocab % tp == 0,
            f"--vocab-size {vocab} must be divisible by --tensor-model-parallel-size {tp}",
        )
    ffn = args.ffn_hidden_size or (4 * hidden if hidden is not None else None)
    if ffn is not None:
        _require(
            ffn % tp == 0,
            f"--ffn-hidden-size {ffn} must be divisible by --tensor-model-parallel-size {tp}",
        )
    _require(
        not args.sequence_parallel or tp > 1,
        "--sequence-parallel needs --tensor-model-parallel-size > 1",
    )
    if args.sequence_parallel and args.seq_length is not None:
        _require(
            args.seq_length % tp == 0,
            f"--seq-length {args.seq_length} "
            f"must be divisible by --tensor-model-parallel-size {tp} with --sequence-parallel",
        )
    max_positions = args.max_position_embeddings or args.seq_length
    if args.seq_length is not None:
        _require(
            args.seq_length <= max_positions,
            f"--seq-length {args.seq_length} exceeds --max-position-embeddings {max_positions}",
        )


def _virtual_size(args: argparse.Namespace, pp: int) -> int | None:
    vp, per_stage = (
        args.virtual_pipeline_model_parallel_size,
        args.num_layers_per_virtual_pipeline_stage,
    )
    if per_stage is None:
        return vp
    _require(
        vp is None,
        "give only one of --virtual-pipeline-model-parallel-size and "
        "--num-layers-per-virtual-pipeline-stage",
    )
    layers_per_rank = args.num_layers // pp
    _require(
        args.num_layers % pp == 0 and layers_per_rank % per_stage == 0,
        f"--num-layers "
        f"{args.num_layers} / --pipeline-model-parallel-size {pp} must be divisible by "
        f"--num-layers-per-virtual-pipeline-stage {per_stage}",
    )
    return layers_per_rank // per_stage


def _registry_options(args: argparse.Namespace, schedule: str, vp: int | None) -> dict[str, Any]:
    _require(
        schedule in names(),
        f"--pipeline-schedule {schedule!r} is unknown; choose one of {', '.join(known_names())}",
    )
    accepted = get(schedule).options
    options: dict[str, Any] = {}
    group = args.microbatch_group_size_per_virtual_pipeline_stage
    for option, value in (
        ("vp", vp),
        ("microbatch_group_size", group),
        ("max_inflight", getattr(args, "max_inflight", None)),
        ("max_stash", getattr(args, "max_stash", None)),
    ):
        if value is None:
            continue
        _require(
            option in accepted,
            f"{flag(option, TRAINER)} is not an option of --pipeline-schedule {schedule}",
        )
        options[option] = value
    return options


def _plan(
    choice: ScheduleChoice, pp: int, num_microbatches: int, front_end: str
) -> Schedule | None:
    """``choice`` built (once: the choice keeps it); ArgumentsError in ``front_end``'s flags."""
    try:
        return choice.build(pp, num_microbatches)
    except ScheduleConfigError as error:
        raise ArgumentsError(
            f"{error.in_words(words(front_end))} (the global batch gives {num_microbatches} "
            f"microbatches per data-parallel rank)"
        ) from error
