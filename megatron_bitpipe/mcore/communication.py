"""The communicators of our steps on megatron's process groups, set up once before training.

``setup_communication(placement, groups)`` creates the p2p channels of every pipeline (one group
per direction of each pair that exchanges messages), then makes one call on every communicator a
step of this rank uses, in the one global order of ``runtime.channels`` that cannot deadlock:
its channels, its pipeline group, its gradient group (replica pair x data parallel) and its
tensor-parallel group. On NCCL a communicator is otherwise created at its first call, inside the
first step, where bidirectional schedules hang (``runtime.nccl_rules``). Our trainer and the
Megatron-LM launcher call it after building the model; ``forward_backward_func`` calls it on
its first use for code that did not.

``p2p_for_step`` builds the step's ``P2P``: receive buffers of the activation shape with
``pipeline_dtype`` on the compute device, waits that never block the host on NCCL (one
``Watchdog`` per process keeps the timeouts), and the channels made here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bitpipe.mcore.cpu import compute_device
from megatron_bitpipe.runtime import (
    P2P,
    CommunicatorSpec,
    Watchdog,
    create_groups,
    initialize_communicators,
    step_communicators,
)
from megatron_bitpipe.runtime.p2p import DEFAULT_TIMEOUT_S, Waits
from megatron_bitpipe.schedules.ir import Action
from megatron_bitpipe.schedules.placement import Placement

WAITS_VARIABLE = "MEGATRON_BITPIPE_P2P_WAITS"
"""Environment override of the wait policy: ``blocking`` or ``watchdog`` (default: by backend)."""


@dataclass
class _Communication:
    channels: dict[tuple[Any, ...], dict[tuple[int, int], dist.ProcessGroup]] = field(
        default_factory=dict
    )
    initialized: set[tuple[Any, ...]] = field(default_factory=set)
    watchdog: Watchdog | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


_STATE = _Communication()


def _key(placement: Placement) -> tuple[Any, ...]:
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    return (placement, *dist.get_process_group_ranks(pp_group))


def setup_communication(
    placement: Placement, groups: Any = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Create the channels and initialize every communicator of a step (collective, once).

    ``groups`` is the ``mcore.groups.GradientGroups`` the chunks were wrapped with (None: the
    gradient group is left to its first use). Every process calls this at the same point.
    """
    _STATE.timeout_s = timeout_s
    key = _key(placement)
    if key in _STATE.initialized:
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    own_pipeline = dist.get_process_group_ranks(pp_group)
    me = dist.get_rank()
    pipelines = sorted({tuple(ranks) for ranks in _everyone(own_pipeline)})
    channels = [spec for spec in step_communicators(placement) if spec.sender is not None]
    created = create_groups([spec.on(ranks) for ranks in pipelines for spec in channels])
    mine = {(spec.sender, spec.receiver): spec.on(own_pipeline) for spec in channels}
    own = {pair: spec for pair, spec in mine.items() if me in spec.ranks}
    _STATE.channels[key] = {pair: created[spec.name] for pair, spec in own.items()}
    entries = [(spec, created[spec.name]) for spec in own.values()]
    entries += [
        entry
        for entry in (
            _collective("pipeline", pp_group),
            _collective("gradients", None if groups is None else groups.group),
            _collective("tensor", parallel_state.get_tensor_model_parallel_group()),
        )
        if entry is not None
    ]
    initialize_communicators(entries, device=compute_device(), timeout_s=timeout_s)
    _STATE.initialized.add(key)


def _everyone(value: Any) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _collective(
    kind: str, group: dist.ProcessGroup | None
) -> tuple[CommunicatorSpec, dist.ProcessGroup] | None:
    if group is None or group.size() < 2:
        return None
    ranks = tuple(dist.get_process_group_ranks(group))
    return CommunicatorSpec(f"{kind} {','.join(map(str, ranks))}", ranks), group


def p2p_waits(group: dist.ProcessGroup) -> Waits:
    """``watchdog`` on NCCL (a timed wait would block the host), ``blocking`` elsewhere."""
    chosen = os.environ.get(WAITS_VARIABLE)
    if chosen is not None:
        if chosen not in ("blocking", "watchdog"):
            raise ValueError(f"{WAITS_VARIABLE}={chosen!r}: expected blocking or watchdog")
        return chosen  # type: ignore[return-value]
    return "watchdog" if dist.get_backend(group) == "nccl" else "blocking"


def p2p_for_step(
    placement: Placement,
    pp_rank: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    completions: Mapping[Action, Sequence[Action]],
) -> P2P:
    """This step's P2P over the channels of ``setup_communication`` (which must have run);
    ``completions`` is this rank's part of ``schedules.lower.send_completions``."""
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    waits = p2p_waits(pp_group)
    if waits == "watchdog" and _STATE.watchdog is None:
        _STATE.watchdog = Watchdog()
    device = compute_device()
    return P2P(
        placement,
        pp_rank,
        lambda action: torch.empty(shape, dtype=dtype, device=device),
        group=pp_group,
        channels=_STATE.channels[_key(placement)],
        timeout_s=_STATE.timeout_s,
        waits=waits,
        watchdog=_STATE.watchdog,
        completions=completions,
    )


def is_set_up(placement: Placement) -> bool:
    return _key(placement) in _STATE.initialized
