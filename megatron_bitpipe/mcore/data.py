"""Deterministic mock GPT data and the forward_step_func megatron's schedules call.

Microbatch ``m`` of data-parallel rank ``k`` at iteration ``i`` is drawn from a seed derived from
``(seed, i, m * DP + k)``: every layout with the same micro-batch size sees the same global batch,
so the single-process run is a valid reference for any PP/TP/DP split and schedule.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_bitpipe.mcore.cpu import compute_device
from megatron_bitpipe.mcore.model import unwrap
from megatron_bitpipe.runtime import faults

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MockGPTData:
    """Learnable mock text: each sequence counts from a random start in a random step, modulo the
    vocabulary (``s, s+d, s+2d, ...``), so the loss falls as the model learns to continue it.
    ``tokens`` and ``labels`` are one sequence shifted by one."""

    seed: int
    vocab_size: int
    seq_length: int
    micro_batch_size: int
    num_microbatches: int
    data_parallel_rank: int = 0
    data_parallel_size: int = 1

    def batch(self, iteration: int, microbatch: int) -> Batch:
        """Microbatch ``microbatch`` of this data-parallel rank at ``iteration`` (0-based)."""
        global_index = microbatch * self.data_parallel_size + self.data_parallel_rank
        digest = hashlib.sha256(f"{self.seed}/data/{iteration}/{global_index}".encode()).digest()
        generator = torch.Generator(device="cpu").manual_seed(
            int.from_bytes(digest[:8], "little") >> 1
        )
        start, step = torch.randint(
            0, self.vocab_size, (2, self.micro_batch_size, 1), generator=generator
        )
        offsets = torch.arange(self.seq_length + 1).unsqueeze(0)
        sequence = (start + (step % 7 + 1) * offsets) % self.vocab_size
        positions = torch.arange(self.seq_length).unsqueeze(0).expand(self.micro_batch_size, -1)
        loss_mask = torch.ones(self.micro_batch_size, self.seq_length)
        if faults.planned("loss", iteration=iteration + 1, microbatch=global_index) is not None:
            loss_mask.fill_(math.nan)  # the nan@loss test fault: this microbatch's loss is NaN
        batch = {
            "tokens": sequence[:, :-1].contiguous(),
            "labels": sequence[:, 1:].contiguous(),
            "loss_mask": loss_mask,
            "position_ids": positions.contiguous(),
        }
        return to_device(batch, compute_device())

    def iterator(self, num_iterations: int, first_iteration: int = 0) -> Iterator[Batch]:
        """Microbatches 0..N-1 of each iteration in turn."""
        for iteration in range(first_iteration, first_iteration + num_iterations):
            for microbatch in range(self.num_microbatches):
                yield self.batch(iteration, microbatch)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Copy a batch to ``device`` without making the host wait: from pinned memory on CUDA."""
    if device.type == "cuda":
        return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def forward_step(
    data_iterator: Iterator[Batch] | None, model: torch.nn.Module
) -> tuple[torch.Tensor, Callable[..., Any]]:
    """megatron's forward_step_func: only chunks with the embedding or the head read data."""
    inner = unwrap(model)
    batch: Batch | None = None
    if (inner.pre_process or inner.post_process) and data_iterator is not None:
        batch = next(data_iterator)
    tokens = batch["tokens"] if batch is not None and inner.pre_process else None
    positions = batch["position_ids"] if batch is not None and inner.pre_process else None
    labels = batch["labels"] if batch is not None and inner.post_process else None
    output = model(tokens, positions, None, labels=labels)
    loss_mask = batch["loss_mask"] if batch is not None else None
    return output, functools.partial(loss_func, loss_mask)


def loss_func(
    loss_mask: torch.Tensor | None, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean token loss of a microbatch; the reported copy is a clone (megatron divides in place)."""
    assert loss_mask is not None, "the head's chunk got no data"
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(output_tensor.float().reshape(-1) * mask) / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}
