"""The runtime's StageCallbacks, built on megatron-core's forward_step / backward_step.

Microbatch ``m`` of the global batch is microbatch ``m`` whichever pipeline carries it: every
chunk that holds a first or last stage draws all N microbatches from its data iterator once per
step (in order 0..N-1) and is handed item ``m`` when it runs microbatch ``m``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.pipeline_parallel import schedules

from megatron_bitpipe.mcore import compat, dropout
from megatron_bitpipe.mcore.weight_grad_store import STORE
from megatron_bitpipe.mcore.cpu import compute_device
from megatron_bitpipe.mcore.model import unwrap
from megatron_bitpipe.schedules.placement import Placement


class MicrobatchFeed:
    """Per-chunk access to microbatch ``m`` of this step's data.

    ``data_iterator`` is one iterator, or one per chunk (megatron's interleaved convention);
    chunks sharing one iterator object share what is drawn from it.
    """

    def __init__(
        self,
        data_iterator: Any,
        needs_data: Sequence[bool],
        num_microbatches: int,
    ) -> None:
        per_chunk = (
            data_iterator if isinstance(data_iterator, list) else [data_iterator] * len(needs_data)
        )
        if len(per_chunk) != len(needs_data):
            raise ValueError(
                f"got {len(per_chunk)} data iterators for {len(needs_data)} model chunks"
            )
        drawn: dict[int, list[Any]] = {}
        self._batches: list[list[Any] | None] = []
        for iterator, needed in zip(per_chunk, needs_data, strict=True):
            if not needed or iterator is None:
                self._batches.append(None)
                continue
            if id(iterator) not in drawn:
                drawn[id(iterator)] = [next(iterator) for _ in range(num_microbatches)]
            self._batches.append(drawn[id(iterator)])

    def iterator(self, chunk: int, microbatch: int) -> Iterator[Any] | None:
        """An iterator yielding exactly microbatch ``microbatch`` for ``chunk`` (None: no data)."""
        batches = self._batches[chunk]
        return None if batches is None else iter([batches[microbatch]])


@dataclass
class MegatronCallbacks:
    """One rank's model work for the Executor, for one forward_backward call.

    ``loss_scale`` multiplies each microbatch's loss before backward (the replica count when the
    chunks' DDP averages over the replicas rather than summing; see ``mcore.groups.wrap_ddp``).
    ``release_outputs``: pseudo-free a sent output at once (megatron's
    ``deallocate_output_tensor``, when the config asks for it).
    """

    model: Sequence[torch.nn.Module]
    placement: Placement
    config: Any
    forward_step_func: Callable[..., Any]
    feed: MicrobatchFeed
    num_microbatches: int
    cp_group_size: int
    loss_scale: float = 1.0
    forward_only: bool = False
    collect_non_loss_data: bool = False
    first_microbatch: dict[int, int] = field(default_factory=dict)
    first_val_step: bool | None = None
    release_outputs: bool = True
    outputs: list[tuple[int, Any]] = field(default_factory=list)
    total_num_tokens: torch.Tensor = field(
        default_factory=lambda: torch.zeros([], dtype=torch.int, device=compute_device())
    )

    def forward(
        self, stage: int, microbatch: int, input_tensor: torch.Tensor | None
    ) -> torch.Tensor:
        """megatron's forward_step on the stage's chunk; the last stage returns the scaled loss."""
        chunk = self.placement.chunk_of(stage)
        store: list[Any] = []
        is_first = schedules.check_first_val_step(
            self.first_val_step, self.forward_only, self.first_microbatch.get(stage) == microbatch
        )
        with dropout.running(microbatch):
            output_tensor, num_tokens = self._forward_step(stage, microbatch, chunk, input_tensor, store, is_first)
        self.outputs.extend((microbatch, item) for item in store)
        # as megatron's schedules do: a CPU scalar adds without a copy, a device one stays there
        self.total_num_tokens += num_tokens
        if self.placement.is_last(stage) and self.loss_scale != 1.0 and not self.forward_only:
            output_tensor = output_tensor * self.loss_scale
        return output_tensor

    def _forward_step(
        self, stage: int, microbatch: int, chunk: int, input_tensor: torch.Tensor | None, store: list[Any],
        is_first: bool,
    ) -> tuple[torch.Tensor, Any]:
        return schedules.forward_step(
            self.forward_step_func,
            self.feed.iterator(chunk, microbatch),
            self.model[chunk],
            self.num_microbatches,
            input_tensor,
            store,
            self.config,
            self.cp_group_size,
            collect_non_loss_data=self.collect_non_loss_data,
            is_first_microbatch=is_first,
            current_microbatch=microbatch,
            vp_stage=getattr(unwrap(self.model[chunk]), "vp_stage", None),
            is_last_stage=self.placement.is_last(stage),
        )

    def backward(
        self,
        stage: int,
        microbatch: int,
        input_tensor: torch.Tensor | None,
        output_tensor: torch.Tensor,
        output_grad: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """megatron's backward_step; returns the gradient for the previous stage.

        An output that has a gradient was sent or handed over; if it still holds its data (a
        same-rank hand-over, whose consumer has its own alias), it is released now, because
        megatron's backward with ``deallocate_pipeline_outputs`` expects a pseudo-freed output.
        """
        chunk = self.model[self.placement.chunk_of(stage)]
        if output_grad is not None:
            schedules.deallocate_output_tensor(
                output_tensor, self.config.deallocate_pipeline_outputs
            )
        with dropout.running(microbatch):  # a recomputed forward draws the masks it drew
            return compat.backward_step(chunk, input_tensor, output_tensor, output_grad, self.config)

    def release_output(self, stage: int, microbatch: int, output_tensor: torch.Tensor) -> None:
        """Right after the output's isend, as megatron does: its data goes, its graph stays.

        The P2P keeps its own reference to the payload until the send completes, so the storage
        lives exactly as long as the transfer needs it.
        """
        if self.release_outputs:
            schedules.deallocate_output_tensor(
                output_tensor, self.config.deallocate_pipeline_outputs
            )

    def backward_input(
        self,
        stage: int,
        microbatch: int,
        input_tensor: torch.Tensor | None,
        output_tensor: torch.Tensor,
        output_grad: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The backward with the linear layers' weight gradients queued for W
        (``mcore.weight_grad_store``); frees the graph like any backward."""
        with STORE.deferring((stage, microbatch)):
            return self.backward(stage, microbatch, input_tensor, output_tensor, output_grad)

    def backward_weight(
        self,
        stage: int,
        microbatch: int,
        input_tensor: torch.Tensor | None,
        output_tensor: torch.Tensor,
        output_grad: torch.Tensor | None,
    ) -> None:
        """The weight gradients the stage's I queued, accumulated into ``main_grad``."""
        STORE.flush((stage, microbatch))

    def reduce_grad(self, stage: int) -> None:
        """Start the chunk's async gradient reduction (DDP with overlap_grad_reduce only).

        Without overlap, megatron's DDP reduces synchronously in finish_grad_sync, so starting
        here as well would reduce twice.
        """
        chunk = self.model[self.placement.chunk_of(stage)]
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_grad_reduce:
            chunk.start_grad_sync()
