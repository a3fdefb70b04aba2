"""What the executor needs from the model: one small Protocol, one method per compute kind.

``stage`` is the global stage id of the schedule; the local model chunk that holds it is
``placement.chunk_of(stage)``. Tensors are whatever the stage takes and returns (the executor only
moves them, detaches hand-overs and stashes them for backward).
"""

from __future__ import annotations

from typing import Protocol

import torch


class StageCallbacks(Protocol):
    """The model work of one rank; ``stage`` is global (local chunk: ``placement.chunk_of``)."""

    def forward(
        self, stage: int, microbatch: int, input_tensor: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the stage. First stages get None and load their data; last stages return the loss."""

    def release_output(self, stage: int, microbatch: int, output_tensor: torch.Tensor) -> None:
        """The output's SEND_F is posted: its data may go, its autograd graph stays for B."""

    def backward(
        self,
        stage: int,
        microbatch: int,
        input_tensor: torch.Tensor | None,
        output_tensor: torch.Tensor,
        output_grad: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Full backward (output_grad None on last stages); return the input's gradient or None."""

    def backward_input(
        self,
        stage: int,
        microbatch: int,
        input_tensor: torch.Tensor | None,
        output_tensor: torch.Tensor,
        output_grad: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Input-gradient half of a split backward; keep the graph for ``backward_weight``."""

    def backward_weight(
        self,
        stage: int,
        microbatch: int,
        input_tensor: torch.Tensor | None,
        output_tensor: torch.Tensor,
        output_grad: torch.Tensor | None,
    ) -> None:
        """Weight-gradient half of a split backward (same tensors ``backward_input`` got)."""

    def reduce_grad(self, stage: int) -> None:
        """Start the async gradient sync of the stage; the caller finishes it before the step."""
