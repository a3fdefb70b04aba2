"""Run under torchrun with 2 processes: megatron-core's own training loop with ``mcore.pipeline``
(BitPipe at PP=2, two replicas of every stage), then, on rank 0 alone, the same loop on one
process with megatron's ``forward_backward_no_pipelining``. Rank 0 prints one line
``facade {json}``: both runs' losses and gradient norms, and what it checked of the pipeline."""

from __future__ import annotations

import json
import warnings

warnings.filterwarnings("ignore")

import megatron.core.pipeline_parallel as pipeline_parallel  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from megatron_bitpipe import mcore  # noqa: E402
from megatron_bitpipe.mcore import communication, cpu  # noqa: E402
from megatron_bitpipe.mcore.data import MockGPTData, forward_step  # noqa: E402
from megatron_bitpipe.mcore.model import restore_layout_helpers  # noqa: E402
from megatron_bitpipe.schedules import ScheduleConfigError  # noqa: E402
from megatron_bitpipe.schedules.placement import looped  # noqa: E402

SEED, LAYERS, HIDDEN, HEADS, SEQ, VOCAB, MICRO_BATCH, MICROBATCHES, ITERATIONS = (
    1234, 4, 32, 4, 16, 64, 2, 4, 3
)


def transformer_config(pipeline_parallel: int) -> TransformerConfig:
    return TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        pipeline_model_parallel_size=pipeline_parallel,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        **cpu.config_overrides(),
    )


def ddp_config() -> DistributedDataParallelConfig:
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True)


def train(model: list, step, optimizer_chunks: list) -> tuple[list[float], list[float]]:
    """ITERATIONS steps of Adam (clipped at 1): every step's mean loss (None off the loss ranks)
    and megatron's gradient norm."""
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, adam_eps=1e-6, clip_grad=1.0), optimizer_chunks
    )
    data = MockGPTData(SEED, VOCAB, SEQ, MICRO_BATCH, MICROBATCHES).iterator(ITERATIONS)
    losses, norms = [], []
    for _ in range(ITERATIONS):
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reported = step(
            forward_step_func=forward_step,
            data_iterator=data,
            model=model if len(model) > 1 else model[0],
            num_microbatches=MICROBATCHES,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        _, norm, _ = optimizer.step()
        losses.append(float(torch.stack([item["lm loss"] for item in reported]).mean()) if reported else None)
        norms.append(float(norm))
    return losses, norms


def with_pipeline() -> dict:
    """The two-process run through ``mcore.pipeline``; what rank 0 saw."""
    config = transformer_config(2)
    try:
        mcore.pipeline("bitpipe", config, ddp_config(), num_microbatches=3, seed=SEED,
                       vocab_size=VOCAB, max_sequence_length=SEQ)
        refused = False
    except ScheduleConfigError:
        refused = config.virtual_pipeline_model_parallel_size is None
    pipe = mcore.pipeline("bitpipe", config, ddp_config(), num_microbatches=MICROBATCHES,
                          seed=SEED, vocab_size=VOCAB, max_sequence_length=SEQ)
    checks = {
        "refused before building": refused,
        "installed": pipeline_parallel.get_forward_backward_func() is pipe.forward_backward_func,
        "communicators set up": communication.is_set_up(pipe.placement),
        "four DDP chunks": len(pipe.model) == 4 and all(hasattr(c, "start_grad_sync") for c in pipe.model),
        "virtual size completed": config.virtual_pipeline_model_parallel_size == 2,
        "finalize completed": config.finalize_model_grads_func is finalize_model_grads,
    }
    losses, norms = train(pipe.model, pipe.forward_backward_func, pipe.optimizer_chunks)
    try:
        mcore.assert_replicas_identical(pipe.model, pipe.groups)
        checks["replicas identical"] = True
    except AssertionError:
        checks["replicas identical"] = False
    communication.release_communication()
    mcore.uninstall()
    return {"losses": losses, "grad_norms": norms, "checks": checks}


def on_one_process() -> dict:
    """megatron's no-pipelining loop on a one-process world: the reference."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    config = transformer_config(1)
    placement = looped(1, 1)
    chunks = mcore.build_chunks(config, placement, share_embeddings_and_output_weights=True,
                                seed=SEED, vocab_size=VOCAB, max_sequence_length=SEQ)
    groups = mcore.create_gradient_groups(placement)
    model = mcore.wrap_ddp(chunks, config, ddp_config(), groups)
    config.no_sync_func = model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    losses, norms = train(model, forward_backward_no_pipelining, model)
    return {"reference_losses": losses, "reference_grad_norms": norms}


def main() -> None:
    cpu.apply()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    result = with_pipeline()
    rank = dist.get_rank()
    restore_layout_helpers()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    if rank == 0:
        result.update(on_one_process())
        print("facade " + json.dumps(result), flush=True)
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
