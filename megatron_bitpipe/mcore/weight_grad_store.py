"""Split backward for zero-bubble schedules: I computes input gradients, W the deferred dW.

An I is megatron's ordinary backward run inside ``deferring(key)``: every megatron linear layer
(``ColumnParallelLinear`` / ``RowParallelLinear``, through
``LinearWithGradAccumulationAndAsyncCommunication``) then computes only its input gradient and
its tensor-parallel communication, and queues what its weight gradient needs (its input, the
output gradient, the weight) under ``key``. It returns no weight gradient, so autograd frees the
rest of the graph at once, as after any backward. Parameters outside linear layers (norms,
embeddings, biases) take their gradients in I, where deferring them buys nothing. W is
``flush(key)``: it computes each queued dW and accumulates it where the fused backward would have
put it: ``main_grad`` (megatron's DDP; through the fused ``wgrad_gemm_accum_fp32`` kernel when
``gradient_accumulation_fusion`` is on and the kernel exists), else ``weight.grad``. DDP's
grad-ready hook still runs in I, on a placeholder it drops (``_placeholder_grad``); the executor
starts gradient reductions at REDUCE_GRAD, after the stage's last W.

Under sequence parallelism the store keeps the layer's local input shard and all-gathers it
again in W (a tensor-parallel collective: every tensor-parallel rank runs the same program, so
the W order is the same on all of them).

``install()`` wraps the backward of megatron's linear function once per process; outside
``deferring`` the original runs unchanged. Transformer Engine's linears are not covered.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
from megatron.core.tensor_parallel import layers

_Function = layers.LinearWithGradAccumulationAndAsyncCommunication


class WeightGradStore:
    """Deferred weight gradients of I actions, by key, until their W runs them."""

    def __init__(self) -> None:
        self._queued: dict[Hashable, list[Callable[[], None]]] = defaultdict(list)
        self.active: Hashable | None = None
        """The key whose I is running now (None: backwards run whole)."""

    @contextlib.contextmanager
    def deferring(self, key: Hashable) -> Iterator[None]:
        """Linear layers' weight gradients computed inside are queued under ``key``."""
        if self.active is not None:
            raise RuntimeError(f"weight gradients of {key} deferred inside those of {self.active}")
        self.active = key
        try:
            yield
        finally:
            self.active = None

    def put(self, compute: Callable[[], None]) -> None:
        assert self.active is not None
        self._queued[self.active].append(compute)

    def discard(self) -> None:
        """Forget every queued weight gradient (a step that failed between an I and its W)."""
        self._queued.clear()
        self.active = None

    def flush(self, key: Hashable) -> int:
        """Compute and accumulate every weight gradient queued under ``key``; return how many."""
        queued = self._queued.pop(key, [])
        for compute in queued:
            compute()
        return len(queued)

    def pending(self) -> list[Hashable]:
        """Keys whose weight gradients are still queued (empty once every W has run)."""
        return list(self._queued)


STORE = WeightGradStore()
"""The process's store: autograd may run backward functions on its own device threads, so the
deferral is process-wide, not per thread (one backward runs at a time)."""

_original_backward: Callable[..., Any] | None = None


def install() -> None:
    """Route megatron's linear backward through ``_backward`` (idempotent)."""
    global _original_backward
    if _original_backward is None:
        _original_backward = _Function.backward
        _Function.backward = staticmethod(layers.custom_bwd(_backward))


def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    assert _original_backward is not None
    if STORE.active is None or getattr(ctx, "grad_output_buffer", None) is not None:
        weight = ctx.saved_tensors[1]
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = False  # as after zero_grad_buffer: a deferral's mark
        return _original_backward(ctx, grad_output)
    return _input_gradient(ctx, grad_output)


def _input_gradient(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """megatron's backward without the weight gradient, which is queued in ``STORE``."""
    input, weight = ctx.saved_tensors
    tp_group = ctx.tp_group
    grad_input = grad_output.matmul(weight)
    if ctx.allreduce_dgrad:
        torch.distributed.all_reduce(grad_input, group=tp_group)
    if ctx.sequence_parallel:
        shard = torch.empty(input.size(), dtype=input.dtype, device=grad_input.device)
        layers.dist_reduce_scatter_func(shard, grad_input, group=tp_group)
        grad_input = shard
    grad_bias = grad_output.sum(dim=0) if ctx.use_bias else None
    fused = ctx.gradient_accumulation_fusion
    sequence_parallel = ctx.sequence_parallel
    STORE.put(lambda: _accumulate_weight_grad(input, grad_output, weight, tp_group, sequence_parallel, fused))
    results = [grad_input, _placeholder_grad(weight, input), grad_bias]
    return tuple(results + [None] * (len(ctx.needs_input_grad) - len(results)))


def _placeholder_grad(weight: torch.Tensor, input: torch.Tensor) -> torch.Tensor | None:
    """What I returns for the weight. Under megatron's DDP a grad-ready hook runs for it and,
    with ``overlap_grad_reduce``, insists on a gradient: hand it an uninitialized one marked as
    already in ``main_grad`` (megatron's fused-accumulation convention), which the hook drops;
    zeros where the weight is marked ``zero_out_wgrad``, whose gradient the hook adds anyway."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.main_grad.shape, dtype=input.dtype, device=input.device)


def _accumulate_weight_grad(
    input: torch.Tensor,
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    tp_group: Any,
    sequence_parallel: bool,
    fused: bool,
) -> None:
    """dW = grad_output^T @ input, added to ``weight.main_grad`` (or ``weight.grad``); runs with
    autograd off, as the backward it was taken from did."""
    with torch.no_grad():
        total_input = input
        if sequence_parallel:
            size = list(input.size())
            size[0] *= tp_group.size()
            total_input = torch.empty(size, dtype=input.dtype, device=input.device)
            layers.dist_all_gather_func(total_input, input, group=tp_group)
        grad_output, total_input = layers.prepare_input_tensors_for_wgrad_compute(grad_output, total_input)
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None:
            if weight.grad is None:
                weight.grad = grad_output.t().matmul(total_input)
            else:
                weight.grad.addmm_(grad_output.t(), total_input)
        elif fused and _fused_kernel() is not None:
            accumulate = _fused_kernel().wgrad_gemm_accum_fp32
            if main_grad.dtype != torch.float32:
                accumulate = _fused_kernel().wgrad_gemm_accum_fp16
            accumulate(total_input, grad_output, main_grad)
        elif main_grad.dtype == grad_output.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        else:
            main_grad.add_(grad_output.t().matmul(total_input))


def _fused_kernel() -> Any:
    """megatron's ``fused_weight_gradient_mlp_cuda`` module, or None where it is missing."""
    return getattr(layers, "fused_weight_gradient_mlp_cuda", None)


def uncovered_linears(chunks: Sequence[torch.nn.Module]) -> list[str]:
    """Names of Transformer Engine modules in ``chunks``: their backward does not go through
    megatron's linear function, so an I would compute their weight gradients too."""
    return [
        name
        for chunk in chunks
        for name, module in chunk.named_modules()
        if type(module).__module__.startswith("transformer_engine")
    ]
