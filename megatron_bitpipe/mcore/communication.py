"""The communicators of our steps on megatron's process groups, set up once before training.

``setup_communication(placement, groups)`` creates the p2p channels of every pipeline (one group
per direction of each pair that exchanges messages), then makes one call on every communicator a
step of this rank uses, in the one global order of ``runtime.channels`` that cannot deadlock:
its channels, its pipeline group, its gradient group (replica pair x data parallel) and its
tensor-parallel group. On NCCL a communicator is otherwise created at its first call, inside the
first step, where a missing peer would be found late and unnamed. Our trainer and the
Megatron-LM launcher call it after building the model; ``forward_backward_func`` calls it on
its first use for code that did not.

Channel groups get the run's timeout (``group_timeout``, default the default group's) and, on
NCCL, high-priority streams. torch hands streams out in turn from a pool of 32 per priority, so
a process may hold at most 32 channels at once (``STREAM_POOL_SIZE``): ``setup_communication``
refuses more, and ``release_communication`` destroys a schedule's channels when its run ends
(our trainer calls it after each schedule of a comma list).

``p2p_for_step`` builds the step's ``P2P``: receive buffers of the activation shape with
``pipeline_dtype`` on the compute device, sends checked against that shape and dtype on the host,
waits that never block the host on NCCL (one ``Watchdog`` per process keeps the timeouts), and
the channels made here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
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
from megatron_bitpipe.runtime.channels import (
    STREAM_POOL_SIZE,
    CommunicatorSetupError,
    destroy_groups,
)
from megatron_bitpipe.runtime.p2p import DEFAULT_TIMEOUT_S, MessageSpec, Waits
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
    groups: dict[tuple[Any, ...], list[dist.ProcessGroup]] = field(default_factory=dict)
    """Each setup's channel groups of this process, in the global initialization order."""
    watchdog: Watchdog | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


_STATE = _Communication()


def _key(placement: Placement) -> tuple[Any, ...]:
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    return (placement, *dist.get_process_group_ranks(pp_group))


def setup_communication(
    placement: Placement,
    groups: Any = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    group_timeout: timedelta | None = None,
) -> None:
    """Create the channels and initialize every communicator of a step (collective, once).

    ``groups`` is the ``mcore.groups.GradientGroups`` the chunks were wrapped with (None: the
    gradient group is left to its first use). ``timeout_s`` bounds each wait of a step;
    ``group_timeout`` is the channel groups' NCCL timeout (default: the default group's).
    Every process calls this at the same point. Raises ``CommunicatorSetupError`` on every rank
    when a rank would hold more than ``STREAM_POOL_SIZE`` channels.
    """
    _STATE.timeout_s = timeout_s
    key = _key(placement)
    if key in _STATE.initialized:
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    own_pipeline = dist.get_process_group_ranks(pp_group)
    me = dist.get_rank()
    channels = [spec for spec in step_communicators(placement) if spec.sender is not None]
    mine = {(spec.sender, spec.receiver): spec.on(own_pipeline) for spec in channels}
    own = {pair: spec for pair, spec in mine.items() if me in spec.ranks}
    would_hold = held_channels() + len(own)
    everyone = _everyone((tuple(own_pipeline), would_hold))
    check_stream_pool(placement, [count for _, count in everyone])
    pipelines = sorted({ranks for ranks, _ in everyone})
    created = create_groups(
        [spec.on(ranks) for ranks in pipelines for spec in channels], timeout=group_timeout
    )
    _STATE.channels[key] = {pair: created[spec.name] for pair, spec in own.items()}
    ordered = sorted(own.values(), key=lambda spec: spec.key)
    _STATE.groups[key] = [created[spec.name] for spec in ordered]
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


def held_channels() -> int:
    """Channel groups this process holds now, over every placement set up and not released."""
    return sum(len(groups) for groups in _STATE.groups.values())


def check_stream_pool(placement: Placement, would_hold: Sequence[int]) -> None:
    """Raise ``CommunicatorSetupError`` if any rank (``would_hold[rank]``: its channels after
    this setup) would hold more channels than torch's stream pool has streams."""
    worst = max(range(len(would_hold)), key=lambda rank: would_hold[rank])
    if would_hold[worst] <= STREAM_POOL_SIZE:
        return
    raise CommunicatorSetupError(
        f"{placement.kind} placement at pipeline-model-parallel-size {placement.num_ranks}: rank "
        f"{worst} would hold {would_hold[worst]} p2p channels at once, but each takes one of the "
        f"{STREAM_POOL_SIZE} high-priority CUDA streams torch pools per GPU and two channels on "
        f"one stream can hang; release a schedule's channels (release_communication) when it ends"
    )


def release_communication() -> None:
    """Destroy every channel group this process holds and forget every setup (collective:
    every process calls it at the same point, after its last step on those channels).

    Setups are undone in the order they were made, each in the global initialization order,
    which every member of a channel shares. The watchdog first forgets the works that
    completed, so it never queries a work of a destroyed communicator."""
    if _STATE.watchdog is not None:
        _STATE.watchdog.release_completed()
    for key in list(_STATE.groups):
        destroy_groups(_STATE.groups.pop(key))
    _STATE.channels.clear()
    _STATE.initialized.clear()


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
        expected=MessageSpec(tuple(shape), dtype),
        group=pp_group,
        channels=_STATE.channels[_key(placement)],
        timeout_s=_STATE.timeout_s,
        waits=waits,
        watchdog=_STATE.watchdog,
        completions=completions,
    )


def is_set_up(placement: Placement) -> bool:
    return _key(placement) in _STATE.initialized
