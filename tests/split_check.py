"""The split backward (I, then W from the weight-gradient store) against megatron's fused one.

Shared by ``test_weight_grad_store.py`` (one process) and ``split_tp_check.py`` (two tensor-parallel
ranks under torchrun). Both build the same megatron ``TransformerBlock`` twice (local spec, fp32,
megatron's DDP so weights have ``main_grad``), run microbatches through one with full backwards and
through the other with I for every microbatch and then W for every microbatch, and compare the
input gradients and every parameter's ``main_grad``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.tensor_parallel import layers
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_bitpipe.mcore import cpu
from megatron_bitpipe.mcore.specs import layer_spec
from megatron_bitpipe.mcore.weight_grad_store import STORE, install

SEQ, MICRO_BATCH, HIDDEN, HEADS, LAYERS = 8, 2, 32, 4, 2


def reference_kernel() -> Any:
    """A stand-in for megatron's fused_weight_gradient_mlp_cuda (absent on CPU): dW += g^T x."""

    def accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        main_grad.add_(grad_output.t().matmul(total_input))

    return SimpleNamespace(wgrad_gemm_accum_fp32=accumulate, wgrad_gemm_accum_fp16=accumulate)


def build(*, sequence_parallel: bool, fusion: bool, recompute: bool, overlap: bool) -> DistributedDataParallel:
    """A DDP-wrapped 2-layer block; the same weights on every call (seeded)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    extra: dict[str, Any] = {}
    if recompute:
        extra = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        gradient_accumulation_fusion=fusion,
        **extra,
        **cpu.config_overrides(),
    )
    torch.manual_seed(5)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    block = TransformerBlock(config, layer_spec(config, LAYERS))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap)
    return DistributedDataParallel(config, ddp_config, block)


def microbatches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output gradient) pairs, the same on every rank; inputs cut to this rank's sequence
    shard under sequence parallelism is left to the caller."""
    generator = torch.Generator().manual_seed(11)
    return [
        (torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=generator), torch.randn(SEQ, MICRO_BATCH, HIDDEN, generator=generator))
        for _ in range(count)
    ]


def run(model: DistributedDataParallel, data: list[tuple[torch.Tensor, torch.Tensor]], split: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Input gradients of every microbatch and every parameter's main_grad afterwards.

    Fused: one backward per microbatch. Split: every microbatch's I, then every W in order.
    """
    install()
    model.zero_grad_buffer()
    input_grads = []
    with model.no_sync():
        for index, (inputs, output_grad) in enumerate(data):
            inputs = inputs.clone().requires_grad_()
            output = model(inputs, attention_mask=None)
            if split:
                with STORE.deferring(index):
                    output.backward(output_grad)
            else:
                output.backward(output_grad)
            input_grads.append(inputs.grad)
        if split:
            for index in range(len(data)):
                assert STORE.flush(index) > 0, f"microbatch {index}: I queued no weight gradient"
    assert not STORE.pending()
    return input_grads, {name: param.main_grad.clone() for name, param in model.module.named_parameters()}


def compare(*, sequence_parallel: bool = False, fusion: bool = False, recompute: bool = False, overlap: bool = False, count: int = 2) -> float:
    """The largest difference between split and fused gradients, relative to each tensor's largest value."""
    previous = getattr(layers, "fused_weight_gradient_mlp_cuda", None), layers._grad_accum_fusion_available
    if fusion:
        layers.fused_weight_gradient_mlp_cuda = reference_kernel()
        layers._grad_accum_fusion_available = True
    try:
        options = dict(sequence_parallel=sequence_parallel, fusion=fusion, recompute=recompute, overlap=overlap)
        data = _local(microbatches(count), sequence_parallel)
        fused_inputs, fused = run(build(**options), data, split=False)
        split_inputs, split = run(build(**options), data, split=True)
    finally:
        layers.fused_weight_gradient_mlp_cuda, layers._grad_accum_fusion_available = previous
    worst = 0.0
    pairs = list(zip(fused_inputs, split_inputs)) + [(fused[name], split[name]) for name in fused]
    for expected, actual in pairs:
        scale = expected.abs().max().clamp_min(1e-30)
        worst = max(worst, float((expected - actual).abs().max() / scale))
    return worst


def _local(data: list[tuple[torch.Tensor, torch.Tensor]], sequence_parallel: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not sequence_parallel:
        return data
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return [(x.chunk(tp)[rank].contiguous(), g.chunk(tp)[rank].contiguous()) for x, g in data]
