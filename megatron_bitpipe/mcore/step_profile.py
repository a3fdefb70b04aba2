"""``--profile-step FILE.json``: what one training step cost on every rank, for the fitted simulator.

Per rank, from every iteration but the first (warm-up) and, with ``--measure-memory``, the last
(run with each action's wall, wait and process CPU time), ``steps``, each with:

* ``actions``: ``[action, start s, end s, waited s, cpu s]`` from the step's start (all ranks
  share the origin of a barrier), every action of the lowered program (none for megatron-core's
  own schedules, whose actions we do not see);
* ``finalize_s`` (gradient syncs left after the program), ``optimizer_s``, ``step_s``;

and once:

* ``chunks``: per local chunk its stage, transformer layers, parameters and whether it holds the
  embedding or the output head;
* ``message``: a calibration after training, pipeline rank pairs (0, 1), (2, 3), ...:
  ``[[bytes, one-way s], ...]`` for messages of 1, 2 and 4 activation sizes;
* ``sync``: ``[bytes, s]``, a blocking all-reduce of this rank's gradient bytes over its
  gradient group (replicas and data parallel), where that group has more than one rank.

On a GPU the calibrations synchronize the device around each timing; the actions' spans are
CUDA-event times, and their ``waited`` is host time, which NCCL's asynchronous receives keep near
0, so a span there includes the message waits (no GPU run has checked this path).

Rank 0 writes ``{"schedule", "num_ranks", "num_microbatches", "activation_bytes", "cpu_time",
"ranks": [...]}`` (JSON); ``megatron_bitpipe.scale.measured_costs`` reads it.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_bitpipe.mcore import forward_backward
from megatron_bitpipe.mcore.cpu import compute_device
from megatron_bitpipe.mcore.model import unwrap

CALIBRATION_SIZES = (1, 2, 4)
"""Message sizes timed after training, in activation sizes."""
CALIBRATION_REPEATS = 5


def step_record(
    iteration: int, origin: float, finalize_s: float, optimizer_s: float, step_s: float, *, traced: bool = True
) -> dict[str, Any]:
    """One measured iteration of this rank: its actions (relative to ``origin``; none unless
    ``traced``, i.e. for megatron-core's own schedules) and its phases."""
    executor = forward_backward.last_executor() if traced else None
    trace = executor.trace if executor is not None else []
    return {
        "iteration": iteration,
        "actions": [
            [str(event.action), event.start - origin, event.end - origin, event.waited, event.cpu]
            for event in trace
        ],
        "finalize_s": finalize_s,
        "optimizer_s": optimizer_s,
        "step_s": step_s,
    }


def rank_record(
    chunks: list[Any], stages: tuple[int, ...], steps: list[dict[str, Any]], message: list[list[float]],
    sync: list[float],
) -> dict[str, Any]:
    """This rank's part of the file: its chunks, its measured steps and its calibrations."""
    group = parallel_state.get_pipeline_model_parallel_group()
    return {
        "rank": dist.get_rank(),
        "pipeline_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "pipeline_group": dist.get_global_rank(group, 0),
        "chunks": [_chunk_facts(chunk, stage) for chunk, stage in zip(chunks, stages, strict=True)],
        "steps": steps,
        "message": message,
        "sync": sync,
    }


def _chunk_facts(chunk: Any, stage: int) -> dict[str, Any]:
    model = unwrap(chunk)
    decoder = getattr(model, "decoder", None)
    layers = len(getattr(decoder, "layers", ())) if decoder is not None else 0
    return {
        "stage": stage,
        "layers": layers,
        "parameters": sum(param.numel() for param in model.parameters()),
        "layer_parameters": sum(param.numel() for param in decoder.layers.parameters()) if layers else 0,
        "embedding": getattr(model, "pre_process", False),
        "head": getattr(model, "post_process", False),
    }


def calibrate_messages(activation_numel: int, dtype: torch.dtype) -> list[list[float]]:
    """One-way seconds of pipeline messages of several sizes between rank pairs (0,1), (2,3), ...
    (a ping-pong, median of ``CALIBRATION_REPEATS``); empty on ranks without a partner."""
    group = parallel_state.get_pipeline_model_parallel_group()
    size, rank = group.size(), parallel_state.get_pipeline_model_parallel_rank()
    partner = rank + 1 if rank % 2 == 0 else rank - 1
    if size < 2 or partner >= size:
        return []
    peer = dist.get_global_rank(group, partner)
    measured = []
    for factor in CALIBRATION_SIZES:
        tensor = torch.zeros(activation_numel * factor, dtype=dtype, device=compute_device())
        samples = []
        for _ in range(CALIBRATION_REPEATS + 1):
            _synchronize()
            start = time.perf_counter()
            if rank % 2 == 0:
                dist.send(tensor, peer, group=group)
                dist.recv(tensor, peer, group=group)
            else:
                dist.recv(tensor, peer, group=group)
                dist.send(tensor, peer, group=group)
            _synchronize()
            samples.append((time.perf_counter() - start) / 2)
        measured.append([tensor.numel() * tensor.element_size(), statistics.median(samples[1:])])
    return measured


def calibrate_sync(chunks: list[Any], group: dist.ProcessGroup) -> list[float]:
    """``[bytes, seconds]`` of one blocking all-reduce of this rank's fp32 gradient bytes over
    ``group`` (median of 3); empty where the group is this rank alone."""
    if group.size() < 2:
        return []
    numel = sum(param.numel() for chunk in chunks for param in unwrap(chunk).parameters())
    buffer = torch.zeros(numel, dtype=torch.float32, device=compute_device())
    samples = []
    for _ in range(4):
        dist.barrier(group=group)
        _synchronize()
        start = time.perf_counter()
        dist.all_reduce(buffer, group=group)
        _synchronize()
        samples.append(time.perf_counter() - start)
    return [numel * 4, statistics.median(samples[1:])]


def _synchronize() -> None:
    """On a GPU, wait for the device: NCCL calls return before their transfer ends."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write(path: str, header: dict[str, Any], record: dict[str, Any]) -> None:
    """Gather every rank's record to rank 0, which writes ``path``."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.gather_object(record, everyone if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() == 0:
        with open(path, "w") as file:
            json.dump({**header, "ranks": everyone}, file)
