"""The megatron-core adapter: the only sub-package that imports megatron.core.

    from megatron_bitpipe import mcore
    mcore.cpu.apply()                                  # only without CUDA
    pipe = mcore.pipeline("bitpipe", config, ddp_config, num_microbatches=N, seed=1234,
                          vocab_size=..., max_sequence_length=...)
    pipe.forward_backward_func(..., model=pipe.model, num_microbatches=N, ...)

``pipeline`` makes, in one call, the calls a loop can also make itself:

    chunks = mcore.build_chunks(config, placement, vocab_size=..., max_sequence_length=...,
                                share_embeddings_and_output_weights=True, seed=1234)
    groups = mcore.create_gradient_groups(placement)
    model = mcore.wrap_ddp(chunks, config, ddp_config, groups)
    mcore.install(schedule="bitpipe")   # megatron's get_forward_backward_func() now runs BitPipe
    mcore.communication.setup_communication(placement, groups)  # else inside the first step

``placement`` is ``mcore.plan(ScheduleChoice(name), D, N)[0].placement``.
"""

from megatron_bitpipe.mcore import cpu
from megatron_bitpipe.mcore.facade import Pipeline, pipeline
from megatron_bitpipe.mcore.forward_backward import (
    ScheduleChoice,
    forward_backward_func,
    install,
    installed,
    last_executor,
    plan,
    uninstall,
)
from megatron_bitpipe.mcore.groups import (
    assert_replicas_identical,
    create_gradient_groups,
    wrap_ddp,
)
from megatron_bitpipe.mcore.model import build_chunks

__all__ = [
    "Pipeline",
    "ScheduleChoice",
    "assert_replicas_identical",
    "build_chunks",
    "cpu",
    "create_gradient_groups",
    "forward_backward_func",
    "install",
    "installed",
    "last_executor",
    "pipeline",
    "plan",
    "uninstall",
    "wrap_ddp",
]
