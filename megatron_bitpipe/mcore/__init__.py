"""The megatron-core adapter: the only sub-package that imports megatron.core.

    from megatron_bitpipe import mcore
    mcore.cpu.apply()                                  # only without CUDA
    chunks = mcore.build_chunks(config, placement, vocab_size=..., max_sequence_length=...,
                                share_embeddings_and_output_weights=True, seed=1234)
    groups = mcore.create_gradient_groups(placement)
    model = mcore.wrap_ddp(chunks, config, ddp_config, groups)
    mcore.install(schedule="bitpipe")   # megatron's get_forward_backward_func() now runs BitPipe

``placement`` is ``mcore.plan(ScheduleChoice(name), D, N)[0].placement``.
"""

from megatron_bitpipe.mcore import cpu
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
    "ScheduleChoice",
    "assert_replicas_identical",
    "build_chunks",
    "cpu",
    "create_gradient_groups",
    "forward_backward_func",
    "install",
    "installed",
    "last_executor",
    "plan",
    "uninstall",
    "wrap_ddp",
]
